/**
 * KV cache element types (kvCacheType, llama.cpp's -ctk/-ctv): quantized K/V hold a token in about
 * half (q8_0) or a quarter (q4_0) of f16's bytes. The paged attention path (kvPaged) reads them
 * through its cell lists like f16: a paged request equals its solo run on the standard cache of the
 * same type, token for token, also under preemption.
 */
import { beforeAll, describe, expect, it } from 'vitest';

import { estimateMemory, InvalidOptionError, loadModel, type LoadModelOptions } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

const base = { contextSize: 256, threads: 2, ...BATCH_INVARIANT } as const;
const PROMPTS = Array.from({ length: 6 }, (_, i) => `Request ${i} keeps its keys and values in fewer bytes`);
const GREEDY = { temperature: 0, ignoreEos: true, maxTokens: 48 } as const;
// Head size 32: a multiple of the quantized types' 32-element blocks.
const SHAPE = { arch: 'llama', type: 'q8_0', nEmbd: 128, nHead: 4, nHeadKv: 2 } as const;

/** Each prompt alone on one sequence of the standard cache, with no prompt cache between them. */
async function soloRuns(path: string, options: LoadModelOptions): Promise<number[][]> {
  const m = await loadModel(path, { ...base, ...options, maxSequences: 1, flashAttention: true, promptCache: false });
  try {
    const out: number[][] = [];
    for (const p of PROMPTS) out.push((await m.complete(p, GREEDY)).tokens);
    return out;
  } finally {
    await m.dispose();
  }
}

describe('KV cache types (kvCacheType)', { timeout: 180_000 }, () => {
  let path: string;
  let f16: number[][];

  beforeAll(async () => {
    path = await makeFixtureModel(SHAPE);
    f16 = await soloRuns(path, {});
  });

  for (const type of ['q8_0', 'q4_0'] as const) {
    it(`reads a ${type} cache through the paged cell lists: concurrent and preempted requests equal solo runs of the standard ${type} cache`, async () => {
      const solo = await soloRuns(path, { kvCacheType: type });
      // The type is really used: rounding the keys and values changes some greedy paths of this model.
      expect(solo).not.toEqual(f16);
      const paged = await loadModel(path, { ...base, maxSequences: 6, kvPaged: true, kvCacheType: type });
      try {
        expect(paged.info.context.kvCacheType).toEqual({ k: type, v: type });
        expect((await Promise.all(PROMPTS.map((p) => paged.complete(p, GREEDY)))).map((r) => r.tokens)).toEqual(solo);
      } finally {
        await paged.dispose();
      }
      // A pool of 160 cells for six requests of ~60 tokens: some are preempted and recomputed.
      const pool = await loadModel(path, { ...base, maxSequences: 6, kvPaged: true, kvBudget: 160, kvCacheType: type });
      try {
        expect((await Promise.all(PROMPTS.map((p) => pool.complete(p, GREEDY)))).map((r) => r.tokens)).toEqual(solo);
        expect(pool.stats().preemptions).toBeGreaterThan(0);
      } finally {
        await pool.dispose();
      }
    });
  }

  it('sizes the KV cache by the type, and takes K and V types apart', async () => {
    const at = async (kvCacheType?: LoadModelOptions['kvCacheType']) =>
      (await estimateMemory(path, { ...base, maxSequences: 2, gpuLayers: 0, ...(kvCacheType ? { kvCacheType } : {}) })).kvBytesPerToken;
    const half = await at();
    expect(half).toBeGreaterThan(0);
    expect(await at('f16')).toBe(half);
    // q8_0: 34 bytes per 32 elements, q4_0: 18, against f16's 64.
    expect((await at('q8_0')) / half).toBeCloseTo(34 / 64, 6);
    expect((await at('q4_0')) / half).toBeCloseTo(18 / 64, 6);
    expect((await at({ k: 'q8_0', v: 'f16' })) / half).toBeCloseTo((34 / 64 + 1) / 2, 6);
    const mixed = await loadModel(path, { ...base, maxSequences: 1, kvCacheType: { k: 'q8_0', v: 'f16' }, flashAttention: false });
    try {
      expect(mixed.info.context.kvCacheType).toEqual({ k: 'q8_0', v: 'f16' });
      expect((await mixed.complete(PROMPTS[0]!, GREEDY)).tokens).toHaveLength(GREEDY.maxTokens);
    } finally {
      await mixed.dispose();
    }
  });

  it('refuses types it cannot honour with InvalidOptionError naming kvCacheType', async () => {
    const bad: unknown[] = ['q9_0', 'Q8_0', 7, { k: 'q8_0' }, { k: 'q8_0', v: 'f16', w: 'f16' }, ['q8_0', 'q8_0'], null];
    for (const kvCacheType of bad) {
      const err = await loadModel(path, { ...base, kvCacheType: kvCacheType as LoadModelOptions['kvCacheType'] }).catch((e: unknown) => e);
      expect(err, JSON.stringify(kvCacheType)).toBeInstanceOf(InvalidOptionError);
      expect((err as InvalidOptionError).option).toBe('kvCacheType');
    }
    // A quantized V needs flash attention.
    const noFa = await loadModel(path, { ...base, kvCacheType: 'q8_0', flashAttention: false }).catch((e: unknown) => e);
    expect(noFa).toBeInstanceOf(InvalidOptionError);
    expect((noFa as InvalidOptionError).option).toBe('kvCacheType');
    // Head size 16 is not a multiple of q8_0's blocks of 32: llama.cpp refuses the context, and
    // the load says why instead of "could not create a context".
    const small = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const blocks = await loadModel(small, { ...base, kvCacheType: 'q8_0' }).catch((e: unknown) => e);
    expect(blocks).toBeInstanceOf(InvalidOptionError);
    expect((blocks as InvalidOptionError).option).toBe('kvCacheType');
    expect((blocks as Error).message).toMatch(/K q8_0 and V q8_0/);
    // MLA keeps K and V in one latent cache: one type for both.
    const mla = await makeFixtureModel({ arch: 'deepseek2', type: 'q8_0', nLayer: 2, nEmbd: 256, nHead: 4, headDim: 96, nExpert: 16, nExpertUsed: 4, nFfExp: 64, mla: { kvLoraRank: 64, qLoraRank: 128 } });
    const split = await loadModel(mla, { ...base, kvCacheType: { k: 'q8_0', v: 'f16' } }).catch((e: unknown) => e);
    expect(split).toBeInstanceOf(InvalidOptionError);
    expect((split as InvalidOptionError).option).toBe('kvCacheType');
    const same = await loadModel(mla, { ...base, kvCacheType: 'q8_0' });
    await same.dispose();
    // ... and the model still loads with a type it can hold.
    const ok = await loadModel(small, { ...base, kvCacheType: 'bf16' });
    try {
      expect(ok.info.context.kvCacheType).toEqual({ k: 'bf16', v: 'bf16' });
    } finally {
      await ok.dispose();
    }
  });
});
