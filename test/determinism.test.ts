import { describe, expect, it } from 'vitest';

import { InvalidOptionError, loadModel } from '../src/index.js';
import { mulberry32 } from '../src/synthetic/models.js';
import { makeFixtureModel } from './fixtures/models.js';

describe('deterministic mode', () => {
  it('gives every concurrent request its solo output, prompt chunks and all', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q4_0', nEmbd: 128, nFf: 256 });
    // batchSize 16 < prompt lengths: prefill is chunked, and must chunk as it does alone.
    const model = await loadModel(path, { contextSize: 128, maxSequences: 6, batchSize: 16, threads: 1, deterministic: true });
    try {
      const random = mulberry32(3);
      const prompts = Array.from({ length: 12 }, () => Array.from({ length: 10 + Math.floor(random() * 40) }, () => 1 + Math.floor(random() * 31000)));
      const gen = (p: number[]) => model.complete(p, { maxTokens: 12, temperature: 0, ignoreEos: true });
      const solo = [];
      for (const p of prompts) solo.push((await gen(p)).tokens);
      const together = await Promise.all(prompts.map(gen));
      expect(together.map((r) => r.tokens)).toEqual(solo);
      const stats = model.stats();
      // Each sequence decoded on its own: at least one step per sequence per token.
      expect(stats.steps).toBeGreaterThanOrEqual(2 * 12 * 12);
    } finally {
      await model.dispose();
    }
  });

  it('refuses a shared KV buffer, which couples the sequences', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    await expect(loadModel(path, { deterministic: true, kvUnified: true })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(loadModel(path, { deterministic: 'yes' as unknown as boolean })).rejects.toMatchObject({ option: 'deterministic' });
  });
});
