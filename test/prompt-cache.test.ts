import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { loadModel, type Model } from '../src/index.js';
import { mulberry32 } from '../src/synthetic/models.js';
import { makeFixtureModel } from './fixtures/models.js';

describe('prompt cache', () => {
  let path: string;
  let cached: Model;
  let uncached: Model;
  const options = { contextSize: 512, maxSequences: 2, batchSize: 64, threads: 1 };

  beforeAll(async () => {
    path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    cached = await loadModel(path, options);
    uncached = await loadModel(path, { ...options, promptCache: false });
  });
  afterAll(async () => {
    await cached?.dispose();
    await uncached?.dispose();
  });

  const random = mulberry32(5);
  const tokens = (n: number) => Array.from({ length: n }, () => 1 + Math.floor(random() * 31000));

  it('skips the prefill of a prefix the slot already holds, with the same output as without the cache', async () => {
    const system = tokens(200);
    const greedy = { maxTokens: 12, temperature: 0, ignoreEos: true };
    for (let turn = 0; turn < 3; turn++) {
      const prompt = [...system, ...tokens(10)];
      const before = cached.stats();
      const r = await cached.complete(prompt, greedy);
      const after = cached.stats();
      const reused = after.cachedPromptTokens - before.cachedPromptTokens;
      const decoded = after.decodedTokens - before.decodedTokens;
      expect(after.promptTokens - before.promptTokens).toBe(prompt.length);
      // The first turn computes everything; later turns reuse the 200-token shared prefix.
      expect(reused).toBe(turn === 0 ? 0 : 200);
      expect(decoded).toBe(prompt.length - reused + 12 - 1);
      expect(r.tokens).toEqual((await uncached.complete(prompt, greedy)).tokens);
    }
    expect(uncached.stats().cachedPromptTokens).toBe(0);
    // Hit rate: 2 of 3 turns reused 200 of their 210 tokens.
    const s = cached.stats();
    expect(s.cachedPromptTokens / s.promptTokens).toBeCloseTo((2 * 200) / (3 * 210), 9);
  });

  it('picks the free slot that shares the longest prefix, and a multi-turn chat reuses its history', async () => {
    const a = tokens(100);
    const b = tokens(100);
    const greedy = { maxTokens: 4, temperature: 0, ignoreEos: true };
    // Two conversations fill the two slots.
    const [ra, rb] = await Promise.all([cached.complete(a, greedy), cached.complete(b, greedy)]);
    // Their next turns, in the opposite order, each find their own history.
    const before = cached.stats().cachedPromptTokens;
    await cached.complete([...b, ...rb.tokens, ...tokens(5)], greedy);
    await cached.complete([...a, ...ra.tokens, ...tokens(5)], greedy);
    // History = prompt + the generated tokens that were decoded (all but the last sampled one).
    expect(cached.stats().cachedPromptTokens - before).toBe(2 * (100 + 3));
  });

  it('is off in deterministic mode', async () => {
    const det = await loadModel(path, { ...options, deterministic: true });
    try {
      const p = tokens(50);
      await det.complete(p, { maxTokens: 2 });
      await det.complete(p, { maxTokens: 2 });
      expect(det.stats().cachedPromptTokens).toBe(0);
    } finally {
      await det.dispose();
    }
  });
});

describe('prefix sharing across sequences', () => {
  let path: string;
  let shared: Model;
  let cold: Model;
  const options = { contextSize: 512, maxSequences: 4, batchSize: 512, threads: 1 };
  const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true };
  const random = mulberry32(17);
  const tokens = (n: number) => Array.from({ length: n }, () => 1 + Math.floor(random() * 31000));

  beforeAll(async () => {
    path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    shared = await loadModel(path, options);
    cold = await loadModel(path, { ...options, promptCache: false });
  });
  afterAll(async () => {
    await shared?.dispose();
    await cold?.dispose();
  });

  it('starts a prompt from the KV of a busy sequence that holds its prefix, with the output of a cold run', async () => {
    const system = tokens(300);
    const first = [...system, ...tokens(8)];
    const second = [...system, ...tokens(6)];
    // The first request holds its slot (and the 300-token prefix) while the second arrives.
    const long = shared.generate(first, { maxTokens: 48, temperature: 0, ignoreEos: true });
    const iterator = long[Symbol.asyncIterator]();
    await iterator.next(); // its prompt is decoded: the prefix is in its stream
    const before = shared.stats();
    const r = await shared.complete(second, greedy);
    const after = shared.stats();
    expect(after.sharedPrefixCopies - before.sharedPrefixCopies).toBe(1);
    expect(after.cachedPromptTokens - before.cachedPromptTokens).toBe(300);
    expect(r.tokens).toEqual((await cold.complete(second, greedy)).tokens);
    const rest = await long.result;
    expect(rest.tokens).toEqual((await cold.complete(first, { maxTokens: 48, temperature: 0, ignoreEos: true })).tokens);
  });

  it('requests arriving together compute their shared prefix once, each with its cold-run output', async () => {
    const system = tokens(400);
    const prompts = [0, 1, 2, 3].map(() => [...system, ...tokens(10)]);
    const before = shared.stats();
    const results = await Promise.all(prompts.map((p) => shared.complete(p, greedy)));
    const after = shared.stats();
    // One computes the 400 shared tokens; the other three copy them and compute their own 10.
    const decodedPrompt = after.decodedTokens - before.decodedTokens - 4 * (greedy.maxTokens - 1);
    expect(decodedPrompt).toBe(410 + 3 * 10);
    expect(after.sharedPrefixCopies - before.sharedPrefixCopies).toBe(3);
    for (const [i, p] of prompts.entries()) expect(results[i]!.tokens).toEqual((await cold.complete(p, greedy)).tokens);
  });
});
