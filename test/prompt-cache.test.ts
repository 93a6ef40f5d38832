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
      // The first turn computes everything; later turns reuse the 200-token shared prefix.
      expect(reused).toBe(turn === 0 ? 0 : 200);
      expect(decoded).toBe(prompt.length - reused + 12 - 1);
      expect(r.tokens).toEqual((await uncached.complete(prompt, greedy)).tokens);
    }
    expect(uncached.stats().cachedPromptTokens).toBe(0);
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
