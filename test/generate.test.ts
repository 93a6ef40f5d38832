/**
 * Single-request generation: greedy parity with llama.cpp's own llama-simple, streaming invariants,
 * UTF-8 safety of chunks, length/context limits, sampling options and option validation.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ContextOverflowError,
  GenesisError,
  InvalidOptionError,
  loadModel,
  type Generation,
  type GenerationChunk,
  type GenerationResult,
  type Model,
  systemInfo,
} from '../src/index.js';
import { referenceTool } from '../scripts/llama.mjs';
import { makeFixtureModel } from './fixtures/models.js';

/**
 * One decode thread per model: ggml's CPU threads spin-wait at every barrier, so on this shared
 * 2-core machine (and with vitest running two files at once) threads: 2 oversubscribes the cores and
 * a step can take 100x longer (measured under load: 4 x 24 greedy tokens 21.8 s with 2 threads,
 * 0.18 s with 1). Results do not depend on the thread count.
 */
const THREADS = 1;

// Built from the same source with the same flags as the addon: the CUDA build's on a GPU machine
// (llama-simple offloads every layer by default, as our models do there).
const LLAMA_SIMPLE = referenceTool('llama-simple', systemInfo().variant);

interface Collected {
  chunks: GenerationChunk[];
  text: string;
  tokens: number[];
  result: GenerationResult;
}

async function collect(run: Generation): Promise<Collected> {
  const chunks: GenerationChunk[] = [];
  for await (const chunk of run) chunks.push(chunk);
  const result = await run.result;
  return { chunks, text: chunks.map((c) => c.text).join(''), tokens: chunks.flatMap((c) => c.tokens), result };
}

/** Runs llama.cpp's reference greedy generator; its stdout is the prompt then the generation, then "\n". */
function llamaSimple(modelPath: string, prompt: string, n: number): string {
  const out = execFileSync(LLAMA_SIMPLE, ['-m', modelPath, '-n', String(n), prompt], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'ignore'],
    timeout: 60_000,
  });
  expect(out.endsWith('\n')).toBe(true);
  return out.slice(0, -1);
}

function isEog(model: Model, token: number): boolean {
  const { eos, eot } = model.info.specialTokens;
  return token === eos || token === eot;
}

/** DeepSeek-V3's shape in small: MLA, 16 experts in 4 groups of which 2 are kept, top 4, scale 2.5. */
const DEEPSEEK = {
  arch: 'deepseek2',
  type: 'q8_0',
  nLayer: 2,
  nEmbd: 256,
  nHead: 4,
  headDim: 96,
  nExpert: 16,
  nExpertUsed: 4,
  nFfExp: 64,
  mla: { kvLoraRank: 64, qLoraRank: 128 },
  expertGroups: { count: 4, used: 2 },
  expertWeightsScale: 2.5,
} as const;

/** Qwen3.5-397B-A17B's layer plan in small: Gated DeltaNet ×3 then gated attention, 16 experts, top 4, one gated shared expert. */
const QWEN35MOE = { arch: 'qwen35moe', type: 'q8_0', nLayer: 4, nEmbd: 128, nHead: 4, nHeadKv: 2, headDim: 32, nExpert: 16, nExpertUsed: 4, nFfExp: 64 } as const;

describe('generate', { timeout: 60_000 }, () => {
  let llamaPath: string;
  let qwenPath: string;
  let deepseekPath: string;
  let qwen35moePath: string;
  let llama: Model;
  let qwen: Model;
  let deepseek: Model;
  let qwen35moe: Model;

  beforeAll(async () => {
    llamaPath = await makeFixtureModel({ arch: 'llama', vocab: 'llama-spm', type: 'f32', nLayer: 2, nEmbd: 64 });
    qwenPath = await makeFixtureModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 2, nEmbd: 64 });
    deepseekPath = await makeFixtureModel(DEEPSEEK);
    qwen35moePath = await makeFixtureModel(QWEN35MOE);
    llama = await loadModel(llamaPath, { contextSize: 256, maxSequences: 4, threads: THREADS });
    qwen = await loadModel(qwenPath, { contextSize: 512, maxSequences: 4, threads: THREADS });
    deepseek = await loadModel(deepseekPath, { contextSize: 256, maxSequences: 2, threads: THREADS });
    qwen35moe = await loadModel(qwen35moePath, { contextSize: 256, maxSequences: 2, threads: THREADS });
  }, 120_000);

  afterAll(async () => {
    await llama?.dispose();
    await qwen?.dispose();
    await deepseek?.dispose();
    await qwen35moe?.dispose();
  });

  it('deepseek2 fixtures route as written: without the group limit the same weights compute something else', async () => {
    const ungrouped = await loadModel(await makeFixtureModel({ ...DEEPSEEK, expertGroups: { count: 1, used: 1 } }), { contextSize: 256, maxSequences: 1, threads: THREADS });
    try {
      const greedy = { maxTokens: 16, temperature: 0, ignoreEos: true };
      const prompts = ['Once upon a time', 'The experts are chosen', 'Hello world'];
      const grouped = await Promise.all(prompts.map((p) => deepseek.complete(p, greedy)));
      const plain = await Promise.all(prompts.map((p) => ungrouped.complete(p, greedy)));
      expect(grouped.map((r) => r.tokens.join(','))).not.toEqual(plain.map((r) => r.tokens.join(',')));
    } finally {
      await ungrouped.dispose();
    }
  });

  describe('greedy output equals llama.cpp llama-simple', () => {
    const N = 24;
    const cases = [
      { name: 'llama f32 (SPM vocab)', model: () => llama, path: () => llamaPath },
      { name: 'qwen3moe f16 (qwen2 byte-level BPE vocab)', model: () => qwen, path: () => qwenPath },
      { name: 'deepseek2 q8_0 (latent attention, group-limited sigmoid routing with bias, shared expert)', model: () => deepseek, path: () => deepseekPath },
      { name: 'qwen35moe q8_0 (Gated DeltaNet + gated attention, softmax top-k routing, gated shared expert)', model: () => qwen35moe, path: () => qwen35moePath },
    ];
    for (const c of cases) {
      it(c.name, async () => {
        expect(existsSync(LLAMA_SIMPLE), `reference tool missing: ${LLAMA_SIMPLE}`).toBe(true);
        const model = c.model();
        let verbatim = 0;
        for (const prompt of ['Hello world', 'Once upon a time']) {
          const promptTokens = model.tokenize(prompt);
          const { result, text } = await collect(model.generate(prompt, { temperature: 0, maxTokens: N, ignoreEos: true }));
          expect(result.tokens).toHaveLength(N);
          expect(result.finishReason).toBe('length');
          // llama-simple stops before an end-of-generation token; we ran with ignoreEos to get N tokens.
          const eog = result.tokens.findIndex((t) => isEog(model, t));
          const compared = eog < 0 ? result.tokens : result.tokens.slice(0, eog);
          const reference = llamaSimple(c.path(), prompt, N);
          // llama-simple prints every token's piece with special=true, the prompt (and its BOS, "<s>"
          // for SPM) included: rebuild the same string from our ids.
          const prefix = model.detokenize(promptTokens, { renderSpecial: true });
          expect(reference.startsWith(prefix)).toBe(true);
          expect(model.detokenize([...promptTokens, ...compared], { renderSpecial: true })).toBe(reference);
          // Our streamed text renders control tokens as nothing; where none was generated it is the
          // reference's generation verbatim.
          const generated = reference.slice(prefix.length);
          const rendersControl = model.detokenize(compared, { renderSpecial: true }) !== model.detokenize(compared);
          if (eog < 0 && !rendersControl) {
            expect(text).toBe(generated);
            verbatim++;
          }
          expect(generated.length).toBeGreaterThan(0);
        }
        expect(verbatim).toBeGreaterThan(0);
      });
    }
  });

  it('streams chunks whose concatenation is the result, with consistent usage', async () => {
    for (const [model, prompt] of [
      [llama, 'The quick brown fox'],
      [qwen, 'The quick brown fox'],
    ] as const) {
      const { chunks, text, tokens, result } = await collect(model.generate(prompt, { temperature: 0, maxTokens: 20 }));
      expect(chunks.length).toBeGreaterThan(1);
      expect(text).toBe(result.text);
      expect(tokens).toEqual(result.tokens);
      expect(result.usage.completionTokens).toBe(result.tokens.length);
      expect(result.usage.promptTokens).toBe(model.tokenize(prompt).length);
      expect(result.tokens.length).toBeGreaterThan(0);
      expect(result.tokens.length).toBeLessThanOrEqual(20);
      if (result.finishReason === 'length') expect(result.tokens).toHaveLength(20);
      else expect(result.finishReason).toBe('eog');
      expect(result.seed).toBeTypeOf('number');
      // complete() is generate().result.
      const again = await model.complete(prompt, { temperature: 0, maxTokens: 20 });
      expect(again.tokens).toEqual(result.tokens);
      expect(again.text).toBe(result.text);
    }
  });

  it('never splits a UTF-8 character across chunks (byte-level BPE)', async () => {
    // Byte-level BPE tokens can be a fragment of a multi-byte character; a fragment detokenized
    // alone is U+FFFD. Find a prompt whose greedy output contains such a token.
    const prompts = ['Hello world', '你好，世界', 'The quick brown fox', 'Once upon a time', 'Ünïcödé ☃ 😀'];
    let found: { prompt: string; collected: Collected; fragments: number[] } | undefined;
    for (const prompt of prompts) {
      const collected = await collect(qwen.generate(prompt, { temperature: 0, maxTokens: 200, ignoreEos: true }));
      const fragments = collected.result.tokens.filter((t) => qwen.detokenize([t]).includes('\uFFFD'));
      if (fragments.length > 0) {
        found = { prompt, collected, fragments };
        break;
      }
    }
    expect(found, 'no greedy output with a partial-UTF-8 token').toBeDefined();
    const { collected, fragments } = found!;
    expect(fragments.length).toBeGreaterThan(0);
    expect(collected.result.tokens).toHaveLength(200);
    // A chunk that ended inside a character would have turned a valid character into U+FFFD.
    const whole = qwen.detokenize(collected.result.tokens);
    expect(collected.text).toBe(whole);
    expect(collected.result.text).toBe(whole);
    const count = (s: string) => [...s].filter((ch) => ch === '\uFFFD').length;
    expect(collected.chunks.reduce((n, c) => n + count(c.text), 0)).toBe(count(whole));
  });

  it('maxTokens ends the run with finishReason "length" and exactly that many tokens', async () => {
    for (const maxTokens of [1, 2, 7]) {
      const r = await llama.complete('Hello', { temperature: 0, maxTokens, ignoreEos: true });
      expect(r.finishReason).toBe('length');
      expect(r.tokens).toHaveLength(maxTokens);
      expect(r.usage.completionTokens).toBe(maxTokens);
    }
    // Greedy: a shorter run is a prefix of a longer one.
    const long = await llama.complete('Hello', { temperature: 0, maxTokens: 7, ignoreEos: true });
    const short = await llama.complete('Hello', { temperature: 0, maxTokens: 3, ignoreEos: true });
    expect(long.tokens.slice(0, 3)).toEqual(short.tokens);
  });

  it('maxTokens 0 is rejected (a generation produces at least one token)', async () => {
    let result: GenerationResult | undefined;
    try {
      result = await llama.complete('Hello', { temperature: 0, maxTokens: 0 });
    } catch (error) {
      expect(error).toBeInstanceOf(InvalidOptionError);
      expect((error as InvalidOptionError).option).toBe('maxTokens');
      return;
    }
    expect(result.tokens).toEqual([]);
    expect(result.usage.completionTokens).toBe(0);
    expect(result.finishReason).toBe('length');
  });

  describe('a 64-token context', () => {
    let small: Model;
    beforeAll(async () => {
      small = await loadModel(llamaPath, { contextSize: 64, maxSequences: 2, threads: THREADS });
    }, 60_000);
    afterAll(async () => {
      await small?.dispose();
    });

    it('rejects a prompt that fills it, synchronously', () => {
      const tokens = Array.from({ length: 64 }, (_, i) => 100 + i);
      let caught: unknown;
      try {
        small.generate(tokens);
      } catch (error) {
        caught = error;
      }
      expect(caught).toBeInstanceOf(ContextOverflowError);
      expect(caught).toBeInstanceOf(GenesisError);
      expect((caught as ContextOverflowError).code).toBe('CONTEXT_OVERFLOW');
      expect((caught as ContextOverflowError).promptTokens).toBe(64);
      expect((caught as ContextOverflowError).contextSize).toBe(64);
      // A text prompt that tokenizes to more than 64 tokens too.
      const text = 'one two three four five six seven eight nine ten '.repeat(8);
      expect(small.tokenize(text).length).toBeGreaterThanOrEqual(64);
      expect(() => small.generate(text)).toThrow(ContextOverflowError);
      // The model is unaffected.
      expect(small.tokenize('Hello')).toEqual([1, 15043]);
    });

    it('ends an unbounded run with finishReason "context" when the sequence is full', async () => {
      const prompt = 'one two three four five six seven eight nine';
      expect(small.tokenize(prompt)).toHaveLength(10);
      const r = await small.complete(prompt, { temperature: 0, ignoreEos: true });
      expect(r.finishReason).toBe('context');
      expect(r.usage.promptTokens).toBe(10);
      // The KV holds 64 tokens: 10 prompt + 54 generated ones are decoded; the 55th token is sampled
      // from the logits of position 63 and never needs a cell, so prompt + completion = contextSize + 1
      // (the same convention as llama-simple, which sizes n_ctx = n_prompt + n_predict - 1).
      expect(r.usage.completionTokens).toBe(55);
      expect(r.usage.promptTokens + r.usage.completionTokens).toBe(65);
      expect(r.tokens).toHaveLength(55);
      // Without ignoreEos the run ends the same way unless an end-of-generation token comes first.
      const r2 = await small.complete(prompt, { temperature: 0 });
      if (r2.finishReason === 'eog') expect(r2.tokens.length).toBeLessThanOrEqual(55);
      else expect(r2).toMatchObject({ finishReason: 'context', usage: { promptTokens: 10, completionTokens: 55 } });
      // The longest allowed prompt (63 tokens) still gets two tokens.
      const full = await small.complete(
        Array.from({ length: 63 }, (_, i) => 100 + i),
        { temperature: 0, ignoreEos: true },
      );
      expect(full.finishReason).toBe('context');
      expect(full.tokens).toHaveLength(2);
    });
  });

  describe('sampling', () => {
    it('is reproducible for a seed, also while other requests run', async () => {
      const opts = { temperature: 1, maxTokens: 16, seed: 1234, ignoreEos: true } as const;
      const solo = await llama.complete('Hello world', opts);
      expect(solo.seed).toBe(1234);
      expect(solo.tokens).toHaveLength(16);
      const runs = [
        llama.generate('Something else entirely', { temperature: 1, maxTokens: 30, seed: 7, ignoreEos: true }),
        llama.generate('Hello world', opts),
        llama.generate('A third prompt', { temperature: 0.7, maxTokens: 20, ignoreEos: true }),
        llama.generate('Hello world', opts),
      ];
      const results = await Promise.all(runs.map((r) => r.result));
      expect(results[1]!.tokens).toEqual(solo.tokens);
      expect(results[3]!.tokens).toEqual(solo.tokens);
      expect(results[1]!.text).toBe(solo.text);
      // A random seed is reported and reproduces the run.
      const random = await llama.complete('Hello world', { temperature: 1, maxTokens: 16, ignoreEos: true });
      const replay = await llama.complete('Hello world', { temperature: 1, maxTokens: 16, ignoreEos: true, seed: random.seed });
      expect(replay.tokens).toEqual(random.tokens);
    });

    it('gives different tokens for different seeds', async () => {
      const outputs = await Promise.all(
        [1, 2, 3].map((seed) => llama.complete('Hello world', { temperature: 1, maxTokens: 16, seed, ignoreEos: true })),
      );
      const keys = new Set(outputs.map((o) => o.tokens.join(',')));
      expect(keys.size).toBe(3);
    });

    it('applies logitBias: +100 forces a token, -Infinity bans the greedy choice', async () => {
      const forced = llama.tokenize('banana', { addSpecial: false })[0]!;
      const r = await llama.complete('Hello world', { temperature: 0, maxTokens: 8, ignoreEos: true, logitBias: { [forced]: 100 } });
      expect(r.tokens).toEqual(Array(8).fill(forced));
      // Map and pair forms are accepted too.
      const viaMap = await llama.complete('Hello world', { temperature: 0, maxTokens: 3, ignoreEos: true, logitBias: new Map([[forced, 100]]) });
      expect(viaMap.tokens).toEqual([forced, forced, forced]);

      const greedy = await llama.complete('Hello world', { temperature: 0, maxTokens: 4, ignoreEos: true });
      const first = greedy.tokens[0]!;
      const banned = await llama.complete('Hello world', {
        temperature: 0,
        maxTokens: 4,
        ignoreEos: true,
        logitBias: [[first, -Infinity]],
      });
      expect(banned.tokens[0]).not.toBe(first);
      expect(banned.tokens).not.toContain(first);
      // Also under sampling, a banned token never appears.
      const sampled = await llama.complete('Hello world', {
        temperature: 1.5,
        topK: 0,
        topP: 1,
        minP: 0,
        maxTokens: 24,
        seed: 5,
        ignoreEos: true,
        logitBias: { [first]: -Infinity },
      });
      expect(sampled.tokens).not.toContain(first);
    });

    it('penalties reduce repetition of a greedy output that repeats', async () => {
      // Random weights never repeat on their own (checked: 32 distinct tokens in every greedy run),
      // so a small logit bias over eight tokens makes greedy cycle among a few of them; the smallest
      // bias that does so leaves room for the penalties to push other tokens up.
      const set = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007];
      const repeats = (t: number[]) => t.length - new Set(t).size;
      const maxCount = (t: number[]) => Math.max(...set.map((s) => t.filter((x) => x === s).length));
      const base = { temperature: 0, maxTokens: 32, ignoreEos: true } as const;
      let logitBias: Record<number, number> = {};
      let baseline: GenerationResult | undefined;
      for (const bias of [0.5, 1, 1.5, 2, 3, 4, 6]) {
        logitBias = Object.fromEntries(set.map((t) => [t, bias]));
        baseline = await llama.complete('Hello world', { ...base, logitBias });
        if (repeats(baseline.tokens) >= 16) break;
      }
      expect(repeats(baseline!.tokens)).toBeGreaterThanOrEqual(16);
      const baseRepeats = repeats(baseline!.tokens);

      for (const penalty of [{ repeatPenalty: 1.5 }, { presencePenalty: 1 }, { frequencyPenalty: 1 }]) {
        const r = await llama.complete('Hello world', { ...base, logitBias, ...penalty });
        expect(r.tokens, JSON.stringify(penalty)).not.toEqual(baseline!.tokens);
        // Measured on the v1 fixture: bias 1.5 is picked, 19 repeats without a penalty, 0 with each one.
        expect(repeats(r.tokens), JSON.stringify(penalty)).toBeLessThan(baseRepeats / 2);
        expect(maxCount(r.tokens), JSON.stringify(penalty)).toBeLessThan(maxCount(baseline!.tokens));
      }
      // A presence/frequency penalty larger than any logit gap forbids every repeat, prompt tokens included.
      for (const penalty of [{ presencePenalty: 100 }, { frequencyPenalty: 100 }]) {
        const r = await llama.complete('Hello world', { ...base, logitBias, ...penalty });
        expect(repeats(r.tokens), JSON.stringify(penalty)).toBe(0);
        for (const t of llama.tokenize('Hello world')) expect(r.tokens).not.toContain(t);
      }
      // penaltyLastN 0 turns the penalties off.
      const off = await llama.complete('Hello world', { ...base, logitBias, repeatPenalty: 1.5, presencePenalty: 1, penaltyLastN: 0 });
      expect(off.tokens).toEqual(baseline!.tokens);
    });
  });

  describe('invalid options', () => {
    it('throw InvalidOptionError naming the option, synchronously, and the model still works', async () => {
      const reference = await llama.complete('Hello', { temperature: 0, maxTokens: 5, ignoreEos: true });
      const cases: Array<[string, Record<string, unknown>]> = [
        ['temperature', { temperature: -1 }],
        ['topP', { topP: 2 }],
        ['topK', { topK: 1.5 }],
        ['maxTokens', { maxTokens: -5 }],
        ['seed', { seed: 2 ** 32 }],
        ['stop', { stop: [''] }],
        ['logitBias', { logitBias: { 999999: 1 } }],
        ['logitBias[5]', { logitBias: { 5: Infinity } }],
        ['minP', { minP: -0.1 }],
        ['repeatPenalty', { repeatPenalty: 0 }],
        ['priority', { priority: 0.5 }],
        ['ignoreEos', { ignoreEos: 'yes' }],
        ['signal', { signal: {} }],
      ];
      for (const [option, opts] of cases) {
        let caught: unknown;
        try {
          llama.generate('Hello', opts);
        } catch (error) {
          caught = error;
        }
        expect(caught, option).toBeInstanceOf(InvalidOptionError);
        expect((caught as InvalidOptionError).option).toBe(option);
        expect((caught as InvalidOptionError).code).toBe('INVALID_OPTION');
        expect((caught as Error).message).toContain(option);
      }
      // Prompt token ids must be integers in [0, vocabSize): the option names the bad position.
      for (const prompt of [[-1], [llama.info.vocabSize], [1, 15043, 32000]]) {
        let caught: unknown;
        try {
          llama.generate(prompt, { maxTokens: 2 });
        } catch (error) {
          caught = error;
        }
        expect(caught, JSON.stringify(prompt)).toBeInstanceOf(InvalidOptionError);
        expect((caught as InvalidOptionError).code).toBe('INVALID_OPTION');
        expect((caught as InvalidOptionError).option).toBe(prompt.length === 3 ? 'prompt[2]' : 'prompt[0]');
      }
      let empty: unknown;
      try {
        llama.generate([]);
      } catch (error) {
        empty = error;
      }
      expect(empty).toBeInstanceOf(InvalidOptionError);
      expect((empty as InvalidOptionError).option).toBe('prompt');

      const after = await llama.complete('Hello', { temperature: 0, maxTokens: 5, ignoreEos: true });
      expect(after.tokens).toEqual(reference.tokens);
      expect(after.text).toBe(reference.text);
    });

    // Not silently converted by Int32Array.from (2**32 and NaN would become 0, 1.5 would become 1).
    it('rejects prompt token ids that are not int32 (2**32, 1.5, NaN)', () => {
      for (const prompt of [[2 ** 32], [1.5], [Number.NaN]]) {
        let caught: unknown;
        try {
          const run = llama.generate(prompt, { maxTokens: 1 });
          run.result.catch(() => {});
        } catch (error) {
          caught = error;
        }
        expect(caught, JSON.stringify(prompt)).toBeInstanceOf(InvalidOptionError);
        expect((caught as InvalidOptionError).option).toBe('prompt[0]');
      }
    });
  });
});
