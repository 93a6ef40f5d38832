/**
 * The continuous-batching engine: batched output equals solo output, queueing and priorities,
 * stop strings across token boundaries, cancellation and disposal with requests in flight.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AbortError,
  DisposedError,
  loadModel,
  type Generation,
  type GenerationChunk,
  type GenerationResult,
  type LoadModelOptions,
  type Model,
} from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';

/**
 * One decode thread per model: ggml's CPU threads spin-wait at every barrier, so on this shared
 * 2-core machine (and with vitest running two files at once) threads: 2 oversubscribes the cores and
 * a step can take 100x longer (measured under load: 4 x 24 greedy tokens 21.8 s with 2 threads,
 * 0.18 s with 1). Results do not depend on the thread count.
 */
const THREADS = 1;

const PROMPTS = [
  'Hello world and more words here to vary the length of this prompt',
  'The quick brown fox',
  'Once upon a time',
  'In the beginning and more words here to vary the length of this prompt',
  'def main():',
  'Lorem ipsum dolor',
  '1, 2, 3, and more words here to vary the length of this prompt',
  'Dear Sir or Madam',
  'The capital of France is',
  'import numpy as np and more words here to vary the length of this prompt',
  'Roses are red',
  'Breaking news:',
  'Q: What is 2+2? and more words here to vary the length of this prompt',
  'int main(void) {',
  'Ich bin ein',
  'Il était une fois and more words here to vary the length of this prompt',
];
const GREEDY = { temperature: 0, maxTokens: 24, ignoreEos: true } as const;

async function solo(model: Model, prompts: string[]): Promise<number[][]> {
  const out: number[][] = [];
  for (const prompt of prompts) out.push((await model.complete(prompt, GREEDY)).tokens);
  return out;
}

/** Runs all prompts at once; returns their tokens and the engine's step/token deltas. */
async function concurrent(model: Model, prompts: string[]): Promise<{ tokens: number[][]; steps: number; decoded: number }> {
  const before = model.stats();
  const results = await Promise.all(prompts.map((p) => model.complete(p, GREEDY)));
  const after = model.stats();
  return { tokens: results.map((r) => r.tokens), steps: after.steps - before.steps, decoded: after.decodedTokens - before.decodedTokens };
}

function mismatches(a: number[][], b: number[][]): Array<{ prompt: number; at: number }> {
  const out: Array<{ prompt: number; at: number }> = [];
  a.forEach((tokens, i) => {
    const at = tokens.findIndex((t, j) => t !== b[i]![j]);
    if (at >= 0 || tokens.length !== b[i]!.length) out.push({ prompt: i, at });
  });
  return out;
}

async function collect(run: Generation): Promise<{ chunks: GenerationChunk[]; text: string; tokens: number[] }> {
  const chunks: GenerationChunk[] = [];
  for await (const chunk of run) chunks.push(chunk);
  return { chunks, text: chunks.map((c) => c.text).join(''), tokens: chunks.flatMap((c) => c.tokens) };
}

/** Waits for a run's first chunk without cancelling it (no return() on the iterator). */
async function firstChunk(run: Generation): Promise<GenerationChunk> {
  const it = run[Symbol.asyncIterator]();
  const first = await it.next();
  if (first.done) throw new Error('the run ended before its first chunk');
  return first.value;
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error('expected a rejection');
}

describe('batching', { timeout: 120_000 }, () => {
  let llamaPath: string;
  let qwenPath: string;
  let llama: Model; // maxSequences 16
  let single: Model; // maxSequences 1
  const soloTokens = new Map<string, number[][]>();

  const load = (path: string, options: LoadModelOptions) => loadModel(path, { contextSize: 128, threads: THREADS, ...options });

  beforeAll(async () => {
    llamaPath = await makeFixtureModel({ arch: 'llama', vocab: 'llama-spm', type: 'f32', nLayer: 2, nEmbd: 64 });
    qwenPath = await makeFixtureModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 2, nEmbd: 64 });
    llama = await load(llamaPath, { maxSequences: 16 });
    single = await load(llamaPath, { maxSequences: 1, contextSize: 512 });
  }, 180_000);

  afterAll(async () => {
    await llama?.dispose();
    await single?.dispose();
  });

  describe('concurrent greedy runs equal solo runs', () => {
    for (const fixture of ['llama', 'qwen3moe'] as const) {
      it(`${fixture}: 16 at once with maxSequences 16 and with maxSequences 4 (12 queued)`, async () => {
        const path = fixture === 'llama' ? llamaPath : qwenPath;
        const wide = fixture === 'llama' ? llama : await load(path, { maxSequences: 16 });
        const narrow = await load(path, { maxSequences: 4 });
        try {
          const reference = await solo(wide, PROMPTS);
          soloTokens.set(fixture, reference);
          expect(new Set(reference.map((t) => t.join(','))).size).toBe(16);
          for (const t of reference) expect(t).toHaveLength(24);

          const all = await concurrent(wide, PROMPTS);
          expect(mismatches(all.tokens, reference)).toEqual([]);
          expect(all.tokens).toEqual(reference);
          // 16 x 24 tokens were sampled in far fewer steps than that: steps decoded several sequences.
          expect(all.steps).toBeGreaterThan(0);
          expect(all.steps).toBeLessThan(16 * 24);
          expect(all.decoded / all.steps).toBeGreaterThan(1);

          const queued = await concurrent(narrow, PROMPTS);
          expect(mismatches(queued.tokens, reference)).toEqual([]);
          expect(queued.tokens).toEqual(reference);
          // Four slots serve 16 requests of 24 sampled tokens each: at least 16 * 24 / 4 steps.
          expect(queued.steps).toBeGreaterThanOrEqual(96);
          expect(queued.steps).toBeLessThan(16 * 24);
          expect(queued.decoded / queued.steps).toBeGreaterThan(1);
          expect(narrow.stats()).toMatchObject({ queued: 0 });
          const stats = wide.stats();
          expect(stats.steps).toBeGreaterThan(0);
          expect(stats.decodedTokens / stats.steps).toBeGreaterThan(1);
        } finally {
          await narrow.dispose();
          if (wide !== llama) await wide.dispose();
        }
      });
    }

    for (const fixture of ['llama', 'qwen3moe'] as const) {
      it(`${fixture}: kvUnified: true`, async () => {
        const path = fixture === 'llama' ? llamaPath : qwenPath;
        // Solo runs of this fixture with the default (per-sequence) KV, from the test above or, when
        // this test runs alone, computed here.
        let reference = soloTokens.get(fixture);
        if (!reference) {
          const separate = await load(path, { maxSequences: 1 });
          reference = await solo(separate, PROMPTS).finally(() => separate.dispose());
        }
        // With flash attention off, batched runs over the unified KV equal solo runs on that model
        // exactly. (Flash attention on vs off alone flips near-ties even for solo runs: measured
        // llama 'Roses are red' from token 0, qwen3moe '1, 2, 3, ...' from token 1; so compare with
        // this model's own solo runs.)
        const exact = await load(path, { maxSequences: 16, kvUnified: true, flashAttention: false });
        try {
          const own = await solo(exact, PROMPTS);
          expect(mismatches((await concurrent(exact, PROMPTS)).tokens, own)).toEqual([]);
        } finally {
          await exact.dispose();
        }
        // With the default (flashAttention 'auto', which enables it on CPU) the batched prefill over
        // one shared KV buffer is not bit-identical to the solo run. Measured on the v1 fixtures:
        // llama f32: 1 mismatch of 16 ('Roses are red', from the first token: the solo run picks
        // 13985, the batched run 532, which is the solo run's second choice - a near tie);
        // qwen3moe f16: 0 or 1 (which requests share a step depends on when the engine thread picks
        // them up, so the cell layout, and with it the rounding, varies run to run). The count is
        // bounded loosely; what must hold is that every mismatch is such a near-tie flip.
        const unified = await load(path, { maxSequences: 16, kvUnified: true });
        try {
          // One request at a time, the unified KV computes exactly what separate streams do.
          expect(await solo(unified, PROMPTS.slice(8, 12))).toEqual(reference.slice(8, 12));
          const tokens = (await concurrent(unified, PROMPTS)).tokens;
          const diff = mismatches(tokens, reference);
          expect(diff.length).toBeLessThanOrEqual(4);
          for (const { prompt, at } of diff) {
            // Ban the solo choice at the divergence point: the batched choice is the runner-up.
            const prefix = [...unified.tokenize(PROMPTS[prompt]!), ...reference[prompt]!.slice(0, at)];
            const runnerUp = await unified.complete(prefix, { ...GREEDY, maxTokens: 1, logitBias: { [reference[prompt]![at]!]: -Infinity } });
            expect(runnerUp.tokens[0]).toBe(tokens[prompt]![at]);
          }
        } finally {
          await unified.dispose();
        }
      });
    }
  });

  it('stats: engine time by phase grows with work, and its parts fit inside the steps', async () => {
    const before = llama.stats().seconds;
    await llama.complete('Time me', { ...GREEDY, maxTokens: 8 });
    await new Promise((resolve) => setTimeout(resolve, 50)); // the engine closes the step after Done
    const after = llama.stats().seconds;
    const d = (k: keyof typeof after) => after[k] - before[k];
    expect(d('step')).toBeGreaterThan(0);
    expect(d('decode')).toBeGreaterThan(0);
    expect(d('sample')).toBeGreaterThan(0);
    expect(d('wait')).toBeGreaterThanOrEqual(0);
    expect(d('decode') + d('wait') + d('sample')).toBeLessThanOrEqual(d('step'));
  });

  it('admits the highest priority first, FIFO among equals', async () => {
    const order: string[] = [];
    const track = (name: string, run: Generation) => run.result.then((r) => (order.push(name), r));
    const a = single.generate('Hello world', { temperature: 0, maxTokens: 64, ignoreEos: true });
    const ra = track('A', a);
    await firstChunk(a);
    // A holds the only sequence for 63 more tokens: B, C and D all wait.
    const b = single.generate('The quick brown fox', GREEDY);
    const c = single.generate('Once upon a time', { ...GREEDY, priority: 5 });
    const d = single.generate('Lorem ipsum dolor', GREEDY);
    const e = single.generate('Breaking news:', { ...GREEDY, priority: -1 });
    const [resA, resB, resC, resD, resE] = await Promise.all([ra, track('B', b), track('C', c), track('D', d), track('E', e)]);
    expect(order).toEqual(['A', 'C', 'B', 'D', 'E']);
    expect(resA.tokens).toHaveLength(64);
    // Waiting times follow the admission order.
    expect(resC.timings.queuedMs).toBeLessThan(resB.timings.queuedMs);
    expect(resB.timings.queuedMs).toBeLessThan(resD.timings.queuedMs);
    expect(resD.timings.queuedMs).toBeLessThan(resE.timings.queuedMs);
    // Priorities change when a request runs, not what it produces.
    const ref = await solo(single, ['The quick brown fox', 'Once upon a time', 'Lorem ipsum dolor', 'Breaking news:']);
    expect([resB.tokens, resC.tokens, resD.tokens, resE.tokens]).toEqual(ref);
  });

  describe('stop strings', () => {
    const prompt = 'Hello world';
    const options = { temperature: 0, maxTokens: 24, ignoreEos: true } as const;
    let original: GenerationResult;
    let pieceEnd: number[]; // pieceEnd[k]: length of original.text through token k

    beforeAll(async () => {
      original = await llama.complete(prompt, options);
      // SPM detokenize drops the first token's leading space; the streamed text keeps it.
      const offset = original.text.length - llama.detokenize(original.tokens).length;
      pieceEnd = original.tokens.map((_, k) => llama.detokenize(original.tokens.slice(0, k + 1)).length + offset);
      expect(pieceEnd.at(-1)).toBe(original.text.length);
    });

    const piece = (k: number) => original.text.slice(k === 0 ? 0 : pieceEnd[k - 1], pieceEnd[k]);

    /** First k >= start whose boundary with k+1 gives a stop string not found earlier in the text. */
    function boundaryStop(start: number): { k: number; stop: string; at: number } {
      for (let k = start; k + 1 < original.tokens.length; k++) {
        const a = piece(k);
        const b = piece(k + 1);
        if (a.length < 2 || b.length < 2 || (a + b).includes('\uFFFD')) continue;
        const stop = a.slice(-2) + b.slice(0, 2);
        const at = pieceEnd[k]! - 2;
        if (original.text.indexOf(stop) === at) return { k, stop, at };
      }
      throw new Error('no usable token boundary');
    }

    it('end the text right before a stop string that spans two tokens', async () => {
      const { k, stop, at } = boundaryStop(4);
      const run = llama.generate(prompt, { ...options, stop: [stop] });
      const { chunks, text, tokens } = await collect(run);
      const r = await run.result;
      expect(r.finishReason).toBe('stop');
      expect(r.text).toBe(original.text.slice(0, at));
      // No chunk ever released a part of the stop string.
      expect(text).toBe(r.text);
      expect(chunks.length).toBeGreaterThan(1);
      // The tokens run up to and including the one that completed the stop string.
      expect(r.tokens).toEqual(original.tokens.slice(0, k + 2));
      expect(tokens).toEqual(r.tokens);
      expect(r.tokens).toContain(original.tokens[k + 1]);
      expect(r.usage.completionTokens).toBe(k + 2);
    });

    it('a stop string that never occurs changes nothing', async () => {
      const r = await llama.complete(prompt, { ...options, stop: ['\u0007never-in-here\u0007', 'QQQZZZ'] });
      expect(r.finishReason).toBe('length');
      expect(r.text).toBe(original.text);
      expect(r.tokens).toEqual(original.tokens);
    });

    it('with several stop strings the earliest match wins', async () => {
      const late = boundaryStop(10);
      const early = boundaryStop(3);
      expect(early.at).toBeLessThan(late.at);
      // A stop string inside one token's piece (third to fifth character of piece 1) too.
      const inner = piece(1).length >= 5 ? piece(1).slice(2, 5) : undefined;
      const innerAt = inner === undefined ? -1 : original.text.indexOf(inner);
      for (const stops of [[late.stop, early.stop], [early.stop, late.stop]]) {
        const r = await llama.complete(prompt, { ...options, stop: stops });
        expect(r.finishReason).toBe('stop');
        expect(r.text).toBe(original.text.slice(0, early.at));
        expect(r.tokens).toEqual(original.tokens.slice(0, early.k + 2));
      }
      if (inner !== undefined && innerAt < early.at) {
        const r = await llama.complete(prompt, { ...options, stop: [late.stop, inner, early.stop] });
        expect(r.finishReason).toBe('stop');
        expect(r.text).toBe(original.text.slice(0, innerAt));
      }
    });
  });

  describe('abort', () => {
    it('aborting a running request rejects it with its partial output; the queued one then runs', async () => {
      const [expectedB] = await solo(single, ['The quick brown fox']);
      const controller = new AbortController();
      const a = single.generate('Hello world', { temperature: 0, maxTokens: 200, ignoreEos: true, signal: controller.signal });
      const b = single.generate('The quick brown fox', GREEDY);
      const chunks: GenerationChunk[] = [];
      let thrown: unknown;
      try {
        for await (const chunk of a) {
          chunks.push(chunk);
          if (chunks.length === 1) controller.abort();
        }
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(AbortError);
      expect((thrown as AbortError).code).toBe('ABORTED');
      const error = await rejection(a.result);
      expect(error).toBeInstanceOf(AbortError);
      expect(error).toBe(thrown);
      const partial = (error as AbortError).partial!;
      expect(partial.tokens.length).toBeGreaterThan(0);
      expect(partial.tokens.length).toBeLessThan(200);
      expect(partial.tokens).toEqual(chunks.flatMap((c) => c.tokens));
      expect(partial.text).toBe(chunks.map((c) => c.text).join(''));
      // What was produced before the abort is the greedy output's prefix.
      const full = await single.complete('Hello world', { temperature: 0, maxTokens: partial.tokens.length, ignoreEos: true });
      expect(partial.tokens).toEqual(full.tokens);

      const rb = await b.result;
      expect(rb.finishReason).toBe('length');
      expect(rb.tokens).toEqual(expectedB);
    });

    it('a signal aborted before generate rejects without running', async () => {
      const controller = new AbortController();
      controller.abort();
      const before = single.stats();
      const run = single.generate('Hello world', { maxTokens: 8, signal: controller.signal });
      const error = await rejection(run.result);
      expect(error).toBeInstanceOf(AbortError);
      expect((error as AbortError).code).toBe('ABORTED');
      expect((error as AbortError).partial).toEqual({ text: '', tokens: [] });
      let thrown: unknown;
      try {
        for await (const _ of run) throw new Error('no chunk expected');
      } catch (e) {
        thrown = e;
      }
      expect(thrown).toBe(error);
      expect(single.stats().steps).toBe(before.steps);
      expect(single.stats().decodedTokens).toBe(before.decodedTokens);
    });

    it('aborting a queued request removes it from the queue', async () => {
      const [expectedC] = await solo(single, ['Once upon a time']);
      const a = single.generate('Hello world', { temperature: 0, maxTokens: 48, ignoreEos: true });
      await firstChunk(a);
      const controller = new AbortController();
      const b = single.generate('The quick brown fox', { ...GREEDY, signal: controller.signal });
      const c = single.generate('Once upon a time', GREEDY);
      controller.abort();
      const error = await rejection(b.result);
      expect(error).toBeInstanceOf(AbortError);
      expect((error as AbortError).partial?.tokens).toEqual([]);
      expect((await a.result).tokens).toHaveLength(48);
      expect((await c.result).tokens).toEqual(expectedC);
    });

    it('breaking out of a for-await loop cancels the run and the next queued request runs', async () => {
      const [expectedB] = await solo(single, ['The quick brown fox']);
      const a = single.generate('Hello world', { temperature: 0, maxTokens: 200, ignoreEos: true });
      const b = single.generate('The quick brown fox', GREEDY);
      const seen: number[] = [];
      for await (const chunk of a) {
        seen.push(...chunk.tokens);
        break;
      }
      expect(seen.length).toBeGreaterThan(0);
      const error = await rejection(a.result);
      expect(error).toBeInstanceOf(AbortError);
      const partial = (error as AbortError).partial!;
      expect(partial.tokens.slice(0, seen.length)).toEqual(seen);
      expect(partial.tokens.length).toBeLessThan(200);
      const rb = await b.result;
      expect(rb.tokens).toEqual(expectedB);
      expect(single.stats()).toMatchObject({ queued: 0 });
    });
  });

  describe('dispose', () => {
    it('rejects running and queued requests with DisposedError; later calls throw DisposedError', async () => {
      const model = await load(llamaPath, { maxSequences: 2, contextSize: 1024 });
      const long = { temperature: 0, maxTokens: 1000, ignoreEos: true } as const;
      const r1 = model.generate('Hello world', long);
      const r2 = model.generate('The quick brown fox', long);
      const r3 = model.generate('Once upon a time', long);
      await Promise.all([firstChunk(r1), firstChunk(r2)]);
      const d1 = model.dispose();
      const d2 = model.dispose();
      expect(model.disposed).toBe(true);
      await Promise.all([d1, d2]);
      await model.dispose();
      for (const run of [r1, r2, r3]) {
        const error = await rejection(run.result);
        expect(error).toBeInstanceOf(DisposedError);
        expect((error as DisposedError).code).toBe('DISPOSED');
      }
      // The iterators end with the same error after the chunks they had buffered.
      let thrown: unknown;
      try {
        for await (const _ of r3) throw new Error('the queued run produced a chunk');
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(DisposedError);
      for (const call of [
        () => model.generate('Hello'),
        () => model.tokenize('Hello'),
        () => model.detokenize([1]),
        () => model.stats(),
        () => model.applyChatTemplate([{ role: 'user', content: 'hi' }]),
      ]) {
        expect(call).toThrow(DisposedError);
      }
      await expect(model.complete('Hello')).rejects.toBeInstanceOf(DisposedError);
    });

    it('supports await using', async () => {
      let captured: Model | undefined;
      let run: Generation | undefined;
      {
        await using model = await load(llamaPath, { maxSequences: 1, contextSize: 1024 });
        captured = model;
        run = model.generate('Hello world', { temperature: 0, maxTokens: 1000, ignoreEos: true });
        await firstChunk(run);
        expect(model.disposed).toBe(false);
      }
      expect(captured.disposed).toBe(true);
      expect(await rejection(run.result)).toBeInstanceOf(DisposedError);
      expect(() => captured!.tokenize('x')).toThrow(DisposedError);
    });
  });
});
