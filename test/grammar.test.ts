import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidOptionError, loadModel, QueueFullError, type Model } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';

const THREADS = 1;

describe('grammar-constrained sampling', { timeout: 120_000 }, () => {
  let llama: Model;
  let qwen: Model;

  beforeAll(async () => {
    llama = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'q8_0' }), { contextSize: 256, maxSequences: 4, threads: THREADS });
    qwen = await loadModel(await makeFixtureModel({ arch: 'qwen3moe', type: 'q8_0' }), { contextSize: 256, maxSequences: 4, threads: THREADS });
  });
  afterAll(async () => {
    await llama?.dispose();
    await qwen?.dispose();
  });

  it('greedy output follows an alternative grammar and ends with end-of-generation', async () => {
    for (const model of [llama, qwen]) {
      for (const prompt of ['Answer:', 'Is it raining?', 'Q: yes or no']) {
        const r = await model.complete(prompt, { temperature: 0, maxTokens: 16, grammar: 'root ::= "yes" | "no"' });
        expect(['yes', 'no'], `${model.info.architecture} ${prompt}`).toContain(r.text);
        expect(r.finishReason).toBe('eog');
      }
    }
  });

  it('a grammar that only matches the empty string ends at once', async () => {
    const r = await llama.complete('Say nothing', { temperature: 0, maxTokens: 8, grammar: 'root ::= ' });
    expect(r.text).toBe('');
    expect(r.finishReason).toBe('eog');
    expect(r.usage.completionTokens).toBe(1);
  });

  it('sampled output follows a structured grammar for every seed', async () => {
    const grammar = 'root ::= "{\\"n\\": " [1-9] [0-9]? [0-9]? ", \\"ok\\": " ("true" | "false") "}"';
    const texts = new Set<string>();
    for (const seed of [1, 2, 3, 4, 5, 6]) {
      const r = await qwen.complete('JSON:', { temperature: 1.5, topK: 0, topP: 1, minP: 0, seed, maxTokens: 40, grammar });
      expect(r.text).toMatch(/^\{"n": [1-9][0-9]{0,2}, "ok": (true|false)\}$/);
      expect(r.finishReason).toBe('eog');
      texts.add(r.text);
    }
    // Sampling still samples: the grammar constrains, it does not pick a single answer.
    expect(texts.size).toBeGreaterThan(1);
  });

  it('constrained and unconstrained sequences share a batch without affecting each other', async () => {
    const free = ['one', 'two'];
    const solo = [];
    for (const p of free) solo.push((await llama.complete(p, { temperature: 0, maxTokens: 12, ignoreEos: true })).tokens);
    const runs = [
      llama.complete(free[0]!, { temperature: 0, maxTokens: 12, ignoreEos: true }),
      llama.complete('A', { temperature: 0, maxTokens: 12, grammar: 'root ::= [a-c]{3}' }),
      llama.complete(free[1]!, { temperature: 0, maxTokens: 12, ignoreEos: true }),
      llama.complete('B', { temperature: 0.9, seed: 9, maxTokens: 12, grammar: 'root ::= [a-c]{3}' }),
    ];
    const [a, b, c, d] = await Promise.all(runs);
    expect(a!.tokens).toEqual(solo[0]);
    expect(c!.tokens).toEqual(solo[1]);
    expect(b!.text).toMatch(/^[a-c]{3}$/);
    expect(d!.text).toMatch(/^[a-c]{3}$/);
  });

  it('a grammar that does not parse is an InvalidOptionError with llama.cpp\'s reason', async () => {
    for (const grammar of ['root ::= ("a"', 'answer ::= "x"', 'root ::= "unterminated', 'root ::= undefined-rule', '']) {
      let caught: unknown;
      try {
        llama.generate('x', { maxTokens: 2, grammar });
      } catch (error) {
        caught = error;
      }
      expect(caught, grammar).toBeInstanceOf(InvalidOptionError);
      expect((caught as InvalidOptionError).option).toBe('grammar');
    }
    let missingRoot: unknown;
    try {
      llama.generate('x', { grammar: 'answer ::= "x"' });
    } catch (error) {
      missingRoot = error;
    }
    expect((missingRoot as Error).message).toMatch(/root/);
    expect((await llama.complete('still fine', { temperature: 0, maxTokens: 3 })).tokens).toHaveLength(3);
  });
});

describe('queue limit', { timeout: 120_000 }, () => {
  it('refuses a request beyond maxQueue with QueueFullError, and accepts again once there is room', async () => {
    const model = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'q8_0' }), {
      contextSize: 2048,
      maxSequences: 1,
      maxQueue: 2,
      threads: THREADS,
    });
    try {
      expect(model.info.context.maxQueue).toBe(2);
      const controller = new AbortController();
      const long = model.generate('long', { maxTokens: 2000, ignoreEos: true, signal: controller.signal });
      const first = long[Symbol.asyncIterator]();
      await first.next(); // running: the queue is empty
      const queued = [model.generate('q1', { maxTokens: 2 }), model.generate('q2', { maxTokens: 2 })];
      let caught: unknown;
      try {
        model.generate('q3', { maxTokens: 2 });
      } catch (error) {
        caught = error;
      }
      expect(caught).toBeInstanceOf(QueueFullError);
      expect((caught as QueueFullError).code).toBe('QUEUE_FULL');
      expect((caught as Error).message).toMatch(/maxQueue 2/);
      controller.abort();
      await expect(long.result).rejects.toMatchObject({ code: 'ABORTED' });
      const done = await Promise.all(queued.map((r) => r.result));
      expect(done.map((r) => r.tokens.length)).toEqual([2, 2]);
      expect((await model.complete('q4', { maxTokens: 2 })).tokens).toHaveLength(2);
    } finally {
      await model.dispose();
    }
    const invalid = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'q8_0' }), { maxQueue: 0 }).catch((e: unknown) => e);
    expect(invalid).toBeInstanceOf(InvalidOptionError);
    expect((invalid as InvalidOptionError).option).toBe('maxQueue');
  });
});
