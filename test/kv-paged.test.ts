/**
 * Paged attention (kvPaged, native/patches/0004-paged-attention.patch): over the shared KV cache,
 * each sequence's attention reads only its own cells, listed in position order, instead of every
 * cell behind a mask. On the CPU each query row is then computed alone, so a sequence's output is
 * its solo run's, bit for bit, whatever else is in the batch, wherever its cells lie, and after a
 * preemption and recompute. Without paging, the unified cache with flash attention does not give
 * that (checked below), which is why test/kv-pool.test.ts runs with flash attention off.
 */
import { beforeAll, describe, expect, it } from 'vitest';

import { InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

const base = { contextSize: 256, threads: 2, ...BATCH_INVARIANT } as const;
const PROMPTS = Array.from({ length: 8 }, (_, i) => `Request number ${i} says hello to the pool of shared memory`);
const GREEDY = { temperature: 0, ignoreEos: true, maxTokens: 60 } as const;

/**
 * Each prompt alone, with a stream of its own: the reference every paged run must equal. Long
 * prompts are compared with paged solo runs: the standard cache prefills them with the tiled flash
 * attention kernel, paged attention with the per-row one (the same sums, another order).
 */
async function soloRuns(path: string, prompts: readonly (string | number[])[], options: { temperature: number; ignoreEos: boolean; maxTokens: number } = GREEDY, paged = false): Promise<number[][]> {
  const solo = await loadModel(path, { ...base, contextSize: 512, maxSequences: 1, flashAttention: true, kvPaged: paged });
  try {
    const out: number[][] = [];
    for (const p of prompts) out.push((await solo.complete(p, options)).tokens);
    return out;
  } finally {
    await solo.dispose();
  }
}

describe('paged attention (kvPaged)', { timeout: 180_000 }, () => {
  let path: string;
  let reference: number[][];

  beforeAll(async () => {
    path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    reference = await soloRuns(path, PROMPTS);
  });

  it('gives 8 concurrent requests their solo outputs token for token, where the masked unified cache does not', async () => {
    const paged = await loadModel(path, { ...base, maxSequences: 8, kvPaged: true });
    const masked = await loadModel(path, { ...base, maxSequences: 8, kvUnified: true, flashAttention: true });
    try {
      expect(paged.info.context.kvPaged).toBe(true);
      expect(masked.info.context.kvPaged).toBe(false);
      const got = await Promise.all(PROMPTS.map((p) => paged.complete(p, GREEDY)));
      expect(got.map((r) => r.tokens)).toEqual(reference);
      // The same batch over every cell behind a mask sums in another order: some outputs drift.
      const drift = await Promise.all(PROMPTS.map((p) => masked.complete(p, GREEDY)));
      expect(drift.filter((r, i) => JSON.stringify(r.tokens) !== JSON.stringify(reference[i])).length).toBeGreaterThan(0);
    } finally {
      await paged.dispose();
      await masked.dispose();
    }
  });

  it('completes 4× more requests than the pool holds, preempted ones equal to their uninterrupted runs', async () => {
    // Each request holds 13 + 60 tokens at the end: 8 need ~580 cells, the pool has 160.
    const m = await loadModel(path, { ...base, maxSequences: 8, kvBudget: 160, kvPaged: true });
    try {
      const got = await Promise.all(PROMPTS.map((p) => m.complete(p, GREEDY)));
      expect(m.stats().preemptions).toBeGreaterThan(0);
      expect(got.map((r) => r.tokens)).toEqual(reference);
      expect(m.stats().active + m.stats().queued + m.stats().kvUsedTokens).toBe(0);
    } finally {
      await m.dispose();
    }
  });

  it('copies preempted sequences out to host memory and back (kvSwapMemory), shared prefix cells included', async () => {
    const ids = (seed: number, n: number) => Array.from({ length: n }, (_, i) => 200 + ((seed * 6007 + i * 7727) % 15000));
    // Six requests on one 48-token prefix: held once that is 48 + 6 × (8 + 40) cells at the end,
    // more than the pool of 160. A preempted one's copy takes the shared cells as its own.
    const prefix = ids(1, 48);
    const prompts = [2, 3, 4, 5, 6, 7].map((seed) => [...prefix, ...ids(seed, 8)]);
    const opts = { temperature: 0, ignoreEos: true, maxTokens: 40 } as const;
    const cold = await soloRuns(path, prompts, opts, true);
    const m = await loadModel(path, { ...base, maxSequences: 6, kvBudget: 160, kvPaged: true, kvSwapMemory: 64 * 2 ** 20 });
    try {
      const got = await Promise.all(prompts.map((p) => m.complete(p, opts)));
      expect(got.map((r) => r.tokens)).toEqual(cold);
      const stats = m.stats();
      expect(stats.preemptions).toBeGreaterThan(0);
      expect(stats.kvSwapIns).toBeGreaterThan(0);
      expect(stats.kvSwapBytes).toBe(0);
      expect(stats.active + stats.queued + stats.kvUsedTokens).toBe(0);
    } finally {
      await m.dispose();
    }
  });

  it('reads a shared prefix once from the pool: prefix hits skip its prefill and outputs equal solo runs', async () => {
    const ids = (seed: number, n: number) => Array.from({ length: n }, (_, i) => 200 + ((seed * 7919 + i * 104729) % 15000));
    const prefix = ids(1, 400);
    const prompts = [2, 3, 4, 5].map((s) => [...prefix, ...ids(s, 20)]);
    const short = { temperature: 0, ignoreEos: true, maxTokens: 20 } as const;
    const cold = await soloRuns(path, prompts, short, true);
    // 4 × (420 + 20) cells without sharing: more than the pool of 1024.
    const m = await loadModel(path, { ...base, contextSize: 512, maxSequences: 4, kvBudget: 1024, kvPaged: true });
    try {
      await m.complete([...prefix, ...ids(9, 20)], short);
      const before = m.stats();
      const results = await Promise.all(prompts.map((p) => m.complete(p, short)));
      const after = m.stats();
      expect(results.map((r) => r.tokens)).toEqual(cold);
      expect(after.cachedPromptTokens - before.cachedPromptTokens).toBeGreaterThanOrEqual(4 * 400);
      expect(after.decodedTokens - before.decodedTokens).toBeLessThanOrEqual(4 * (20 + 19) + 4);
      expect(after.preemptions).toBe(0);
    } finally {
      await m.dispose();
    }
  });

  it('without kvBudget pools the whole cache, so a finished prompt is still reused (multi-turn)', async () => {
    // The H100 shared-prefix run found paged attention without a budget computing every prompt in
    // full: the prompt cache needs the pool's bookkeeping, which kvPaged now always has.
    const m = await loadModel(path, { ...base, maxSequences: 4, kvPaged: true });
    try {
      expect(m.info.context.totalContext).toBe(256 * 4);
      expect(m.stats().kvCapacityTokens).toBe(256 * 4);
      const turn1 = 'A long first turn of a chat, which the second turn repeats before adding its own question:';
      const first = await m.complete(turn1, { ...GREEDY, maxTokens: 8 });
      const before = m.stats();
      const second = await m.complete(turn1 + first.text + ' and then?', { ...GREEDY, maxTokens: 8 });
      const after = m.stats();
      expect(after.cachedPromptTokens - before.cachedPromptTokens).toBeGreaterThanOrEqual(first.usage.promptTokens);
      expect(after.promptTokens - before.promptTokens).toBe(second.usage.promptTokens);
      expect(second.usage.completionTokens).toBe(8);
    } finally {
      await m.dispose();
    }
  });

  const shapes: Array<[string, Parameters<typeof makeFixtureModel>[0]]> = [
    // MLA: the K-only cache, V a view of it
    [
      'DeepSeek-V3-shaped (MLA, K-only cache)',
      { arch: 'deepseek2', type: 'q8_0', nLayer: 2, nEmbd: 256, nHead: 4, headDim: 96, nExpert: 16, nExpertUsed: 4, nFfExp: 64, mla: { kvLoraRank: 64, qLoraRank: 128 }, expertGroups: { count: 4, used: 2 }, expertWeightsScale: 2.5 },
    ],
    // hybrid: Gated DeltaNet state plus attention layers
    ['Qwen3.5-MoE-shaped (hybrid recurrent + attention)', { arch: 'qwen35moe', type: 'f16', nLayer: 4, nEmbd: 64, nHead: 4, nHeadKv: 2, headDim: 16, nFf: 128, nExpert: 16, nExpertUsed: 4, nFfExp: 64 }],
  ];
  for (const [name, shape] of shapes) {
    it(`runs a ${name} model paged, under preemption, equal to its solo runs, cell by cell and in blocks`, async () => {
      const p = await makeFixtureModel(shape);
      const prompts = PROMPTS.slice(0, 6);
      const expected = await soloRuns(p, prompts);
      for (const kvBlockSize of [1, 16]) {
        const m = await loadModel(p, { ...base, maxSequences: 6, kvBudget: 160, kvPaged: true, kvBlockSize });
        try {
          const got = await Promise.all(prompts.map((q) => m.complete(q, GREEDY)));
          expect(m.stats().preemptions).toBeGreaterThan(0);
          expect(got.map((r) => r.tokens)).toEqual(expected);
        } finally {
          await m.dispose();
        }
      }
    });
  }

  describe('in blocks (kvBlockSize)', () => {
    it('holds a sequence in whole blocks and gives concurrent requests their solo outputs', async () => {
      const cells = await loadModel(path, { ...base, maxSequences: 8, kvPaged: true });
      const blocks = await loadModel(path, { ...base, maxSequences: 8, kvPaged: true, kvBlockSize: 16 });
      try {
        expect(blocks.info.context.kvBlockSize).toBe(16);
        expect(cells.info.context.kvBlockSize).toBe(1);
        expect(blocks.stats().kvPoolBlocks).toBe(blocks.stats().kvCapacityTokens / 16);
        expect(blocks.stats().kvPoolUsedBlocks).toBe(0);
        // One finished request stays cached: cell by cell it holds n cells, in blocks ⌈n/16⌉ blocks.
        await cells.complete(PROMPTS[0]!, GREEDY);
        await blocks.complete(PROMPTS[0]!, GREEDY);
        const n = cells.stats().kvPoolUsedTokens;
        expect(n).toBeGreaterThan(60);
        expect(n % 16).not.toBe(0);
        expect(cells.stats().kvPoolUsedBlocks).toBe(n);
        expect(blocks.stats().kvPoolUsedBlocks).toBe(Math.ceil(n / 16));
        expect(blocks.stats().kvPoolUsedTokens).toBe(Math.ceil(n / 16) * 16);
        // All 8 at once (prompts of one length), each growing in blocks of its own: 8 partly filled
        // last blocks, where cells taken one by one would interleave the sequences over ⌈8n/16⌉.
        const got = await Promise.all(PROMPTS.map((p) => blocks.complete(p, GREEDY)));
        expect(got.map((r) => r.tokens)).toEqual(reference);
        await Promise.all(PROMPTS.map((p) => cells.complete(p, GREEDY)));
        expect(cells.stats().kvPoolUsedTokens).toBe(8 * n);
        expect(blocks.stats().kvPoolUsedBlocks).toBe(8 * Math.ceil(n / 16));
        expect(blocks.stats().kvPoolUsedBlocks).toBeGreaterThan(Math.ceil((8 * n) / 16));
      } finally {
        await cells.dispose();
        await blocks.dispose();
      }
    });

    it('completes 4× more requests than the pool holds, preempted and recomputed or swapped, equal to their solo runs', async () => {
      for (const kvSwapMemory of [0, 64 * 2 ** 20]) {
        const m = await loadModel(path, { ...base, maxSequences: 8, kvBudget: 160, kvPaged: true, kvBlockSize: 16, kvSwapMemory });
        try {
          const got = await Promise.all(PROMPTS.map((p) => m.complete(p, GREEDY)));
          const stats = m.stats();
          expect(stats.preemptions).toBeGreaterThan(0);
          if (kvSwapMemory > 0) expect(stats.kvSwapIns).toBeGreaterThan(0);
          expect(got.map((r) => r.tokens)).toEqual(reference);
          expect(stats.active + stats.queued + stats.kvUsedTokens + stats.kvSwapBytes).toBe(0);
        } finally {
          await m.dispose();
        }
      }
    });

    it('shares a prefix between sequences in whole blocks, computing the partial last block', async () => {
      const ids = (seed: number, n: number) => Array.from({ length: n }, (_, i) => 200 + ((seed * 7919 + i * 104729) % 15000));
      // 410 prompt tokens in common: 25 whole blocks of 16 (400) and 10 more.
      const prefix = ids(1, 410);
      const prompts = [2, 3, 4, 5].map((s) => [...prefix, ...ids(s, 20)]);
      const short = { temperature: 0, ignoreEos: true, maxTokens: 20 } as const;
      const cold = await soloRuns(path, prompts, short, true);
      const m = await loadModel(path, { ...base, contextSize: 512, maxSequences: 4, kvBudget: 1024, kvPaged: true, kvBlockSize: 16 });
      try {
        await m.complete([...prefix, ...ids(9, 20)], short);
        const before = m.stats();
        const results = await Promise.all(prompts.map((p) => m.complete(p, short)));
        const after = m.stats();
        expect(results.map((r) => r.tokens)).toEqual(cold);
        // The finished sequence's own slot continues its cache (410); the three others copy its 25
        // whole blocks (400 each) and compute the rest.
        expect(after.sharedPrefixCopies - before.sharedPrefixCopies).toBe(3);
        expect(after.cachedPromptTokens - before.cachedPromptTokens).toBe(410 + 3 * 400);
        expect(after.preemptions).toBe(0);
      } finally {
        await m.dispose();
      }
    });
  });

  it('refuses options it cannot honour, with typed errors naming them', async () => {
    const bad = [
      { kvPaged: true, kvUnified: false },
      { kvPaged: true, flashAttention: false },
      { kvPaged: 'yes' },
    ];
    for (const options of bad) {
      const err = await loadModel(path, { ...base, ...(options as object) }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidOptionError);
      expect((err as InvalidOptionError).option).toBe('kvPaged');
    }
    for (const options of [{ kvPaged: true, kvBlockSize: 12 }, { kvPaged: true, kvBlockSize: 512 }, { kvPaged: true, kvBlockSize: 0 }, { kvBlockSize: 16 }, { kvBudget: 256, kvBlockSize: 16 }]) {
      const err = await loadModel(path, { ...base, ...options }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidOptionError);
      expect((err as InvalidOptionError).option).toBe('kvBlockSize');
    }
    let draft: Model | undefined;
    try {
      draft = await loadModel(path, { ...base, maxSequences: 1 });
      const err = await loadModel(path, { ...base, kvPaged: true, draft: { model: draft } }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidOptionError);
      expect((err as InvalidOptionError).option).toBe('kvPaged');
    } finally {
      await draft?.dispose();
    }
  });
});
