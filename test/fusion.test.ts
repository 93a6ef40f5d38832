/**
 * Logit fusion (runtime.fuse / fuse): models sharing a tokenizer step in lockstep, each in its own
 * engine's batches, and one sampler chooses from their weighted log-probabilities.
 */
import { spawnSync } from 'node:child_process';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createRuntime, fuse, InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

describe('logit fusion', () => {
  let a: Model;
  let b: Model;
  let aPath: string;
  let bPath: string;
  // Fused runs are compared with and without ordinary requests beside them: CPU (fixtures/gpu.ts).
  const options = { contextSize: 256, maxSequences: 4, batchSize: 64, threads: 1, ...BATCH_INVARIANT };
  const greedy = { maxTokens: 24, temperature: 0, ignoreEos: true };
  const prompt = 'Once upon a time';

  beforeAll(async () => {
    aPath = await makeFixtureModel({ arch: 'llama', type: 'q8_0', nLayer: 2 });
    bPath = await makeFixtureModel({ arch: 'llama', type: 'q8_0', nLayer: 2, seed: 9 });
    a = await loadModel(aPath, options);
    b = await loadModel(bPath, options);
  });
  afterAll(async () => {
    await a?.dispose();
    await b?.dispose();
  });

  it('weights (1, 0) give the first model alone, token for token; the second still steps in lockstep', async () => {
    const alone = await a.complete(prompt, greedy);
    const before = b.stats().decodedTokens;
    const fused = await fuse([{ model: a, weight: 1 }, { model: b, weight: 0 }]).complete(prompt, greedy);
    expect(fused.tokens).toEqual(alone.tokens);
    expect(fused.text).toBe(alone.text);
    // b decoded the prompt and every fused token but the last, as a does.
    expect(b.stats().decodedTokens - before).toBe(fused.usage.promptTokens + greedy.maxTokens - 1);
  });

  it('keeps a process whose only work is a fused generation alive until it ends', async () => {
    // Each step's logits event must not count as the request ending: the engines would drop their
    // hold on the event loop and the process would exit (and crash in cleanup) mid-generation.
    const index = new URL('../src/index.ts', import.meta.url).pathname;
    const script = `
      const { fuse, loadModel } = await import(${JSON.stringify(index)});
      const o = { contextSize: 256, maxSequences: 2, threads: 1 };
      const a = await loadModel(${JSON.stringify(aPath)}, o);
      const b = await loadModel(${JSON.stringify(bPath)}, o);
      const r = await fuse([{ model: a, weight: 1 }, { model: b, weight: 1 }]).complete('Once upon a time', { maxTokens: 32, temperature: 0, ignoreEos: true });
      console.log('completed', r.usage.completionTokens);
      await a.dispose();
      await b.dispose();`;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 120_000 });
    expect(r.stderr).not.toMatch(/terminate called/);
    expect(r.stdout).toContain('completed 32');
    expect(r.status).toBe(0);
  });

  it('a model fused with itself gives the model alone (greedy)', async () => {
    const alone = await b.complete(prompt, greedy);
    expect((await fuse([{ model: b, weight: 0.5 }, { model: b, weight: 0.5 }]).complete(prompt, greedy)).tokens).toEqual(alone.tokens);
  });

  it('two different models give one text, streamed as any generation, and reproducible with a seed', async () => {
    const duo = fuse([{ model: a, weight: 1 }, { model: b, weight: 1 }]);
    const r = await duo.complete(prompt, greedy);
    expect(r.tokens).toHaveLength(24);
    // Streamed chunks add up to the result; the same call gives the same text.
    const g = duo.generate(prompt, greedy);
    let text = '';
    for await (const chunk of g) text += chunk.text;
    expect(text).toBe((await g.result).text);
    expect((await g.result).tokens).toEqual(r.tokens);
    // Sampled with a seed: reproducible.
    const sampled = { maxTokens: 16, temperature: 0.9, seed: 42, ignoreEos: true };
    expect((await duo.complete(prompt, sampled)).tokens).toEqual((await duo.complete(prompt, sampled)).tokens);
  });

  it('runs beside ordinary requests on the same engines, and stops where a member would (stop strings, maxTokens)', async () => {
    const [plain, fused] = await Promise.all([
      a.complete('The quick brown fox', greedy),
      fuse([{ model: a, weight: 1 }, { model: b, weight: 0 }]).complete(prompt, { ...greedy, maxTokens: 5 }),
    ]);
    expect(plain.tokens).toEqual((await a.complete('The quick brown fox', greedy)).tokens);
    expect(fused.usage.completionTokens).toBe(5);
    expect(fused.finishReason).toBe('length');
  });

  it('refuses models with other tokenizers, bad weights and options fusion does not apply', async () => {
    const other = await loadModel(await makeFixtureModel({ arch: 'qwen3moe' }), { contextSize: 128, maxSequences: 1, threads: 1 });
    try {
      expect(() => fuse([{ model: a, weight: 1 }, { model: other, weight: 1 }])).toThrow(InvalidOptionError);
      expect(() => fuse([{ model: a, weight: 1 }, { model: other, weight: 1 }])).toThrow(/same tokenizer/);
    } finally {
      await other.dispose();
    }
    expect(() => fuse([])).toThrow(InvalidOptionError);
    expect(() => fuse([{ model: a, weight: -1 }])).toThrow(/weight/);
    expect(() => fuse([{ model: a, weight: 0 }])).toThrow(/at least one weight/);
    expect(() => fuse([{ model: a, weight: 1 }]).generate(prompt, { repeatPenalty: 1.2 })).toThrow(/repeatPenalty/);
  });

  it('members with different context sizes end together at the smallest', async () => {
    const small = await loadModel(bPath, { ...options, contextSize: 32 });
    try {
      const r = await fuse([{ model: a, weight: 1 }, { model: small, weight: 0 }]).complete(prompt, { maxTokens: 100, temperature: 0, ignoreEos: true });
      expect(r.usage.promptTokens + r.usage.completionTokens).toBe(31);
      expect(r.tokens).toEqual((await a.complete(prompt, { ...greedy, maxTokens: r.usage.completionTokens })).tokens);
    } finally {
      await small.dispose();
    }
  });

  it('an abort ends every member', async () => {
    const controller = new AbortController();
    const g = fuse([{ model: a, weight: 1 }, { model: b, weight: 1 }]).generate(prompt, { maxTokens: 10_000, temperature: 0, ignoreEos: true, signal: controller.signal });
    let n = 0;
    const error = await (async () => {
      for await (const chunk of g) {
        n += chunk.tokens.length;
        if (n >= 3) controller.abort();
      }
    })().catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'ABORTED' });
    await expect.poll(() => a.stats().active + b.stats().active).toBe(0);
    // A signal aborted before the start ends it at once.
    const early = new AbortController();
    early.abort();
    await expect(fuse([{ model: a, weight: 1 }]).complete(prompt, { ...greedy, signal: early.signal })).rejects.toMatchObject({ code: 'ABORTED' });
  });

  it('runtime.fuse holds every member while a fused generation runs', async () => {
    const runtime = createRuntime({ memoryBudget: 8 * 2 ** 30 });
    try {
      runtime.register('a', aPath, options);
      runtime.register('b', bPath, options);
      const r = await runtime.fuse([{ model: 'a', weight: 1 }, { model: 'b', weight: 0 }]).complete(prompt, greedy);
      expect(r.tokens).toEqual((await a.complete(prompt, greedy)).tokens);
      expect(runtime.statusOf('a').active).toBe(0);
      expect(() => runtime.fuse([{ model: 'nosuch', weight: 1 }])).toThrow(InvalidOptionError);
    } finally {
      await runtime.dispose();
    }
  });
});
