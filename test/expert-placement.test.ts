/**
 * Expert placement (native/patches/0010-moe-expert-placement.patch): copies of the hottest experts
 * of each MoE layer on the layer's device; the CPU computes the other routed tokens over the
 * layer's own tensors in host memory, skipping the copied experts. On this CPU build the layer's
 * device is the CPU as well, so these tests check what placement must never change and what it
 * must choose: the output token for token (greedy, sampled, batched), the hottest experts by the
 * given or counted heat, the share of the traffic the copies took, and typed errors on misuse.
 * Its speed against all-on-GPU and --n-cpu-moe is the GPU benchmark's (gpu-checks.mjs placement).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { InvalidOptionError, loadModel, type ExpertStats, type Model } from '../src/index.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';
import { DEEPSEEK_GROUPED, makeFixtureModel } from './fixtures/models.js';

const THREADS = 2;
const QWEN = { arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 3, nEmbd: 64 } as const; // 8 experts, 2 used
// On the CPU also in a GPU build: there the copies would run the GPU's kernels and the host side the
// CPU's, close but not equal bit for bit (their speed and agreement: gpu-checks.mjs placement).
const base = { ...BATCH_INVARIANT, contextSize: 256, maxSequences: 4, threads: THREADS, cpuMoeLayers: 3, expertStats: true } as const;
const greedy = { temperature: 0, ignoreEos: true, maxTokens: 16 } as const;
const sampled = { temperature: 0.9, topK: 20, seed: 1234, ignoreEos: true, maxTokens: 16 } as const;
const PROMPTS = ['Once upon a time there was', 'The capital of France is', 'def fibonacci(n):', '1, 2, 3, 4,'];

/** The `n` experts of each layer with the highest counts, ties to the lower id (the engine's order). */
function hottest(stats: ExpertStats, n: number): number[][] {
  return stats.layers.map((l) =>
    l.counts
      .map((c, e) => [c, e] as const)
      .sort((a, b) => b[0] - a[0] || a[1] - b[1])
      .slice(0, n)
      .map(([, e]) => e),
  );
}

/** Every step's logits on the model's greedy path (logit fusion's external sampling). */
async function logits(model: Model, prompt: string, steps = 8): Promise<Float32Array[]> {
  const rows: Float32Array[] = [];
  const g = model._generateExternal(Int32Array.from(model.tokenize(prompt)), { maxTokens: steps, ignoreEos: true });
  g._onLogits = (row: Float32Array) => {
    rows.push(Float32Array.from(row));
    let best = 0;
    for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
    model._feed(g.id, best);
  };
  await g.result;
  return rows;
}

async function outputs(model: Model, options: object): Promise<number[][]> {
  return Promise.all(PROMPTS.map(async (p) => (await model.complete(p, options)).tokens));
}

describe('expert placement', { timeout: 240_000 }, () => {
  let qwenPath: string;
  let dsPath: string;
  let plain: Model; // qwen3moe, experts in host memory, no copies
  let dsPlain: Model;
  let heat: ExpertStats; // plain's counts over the prompts
  let dsHeat: ExpertStats;
  const want: Record<string, number[][]> = {};
  let wantLogits: Float32Array[];
  let dsWantLogits: Float32Array[];

  beforeAll(async () => {
    // f16: no CPU repacking of either fixture (placement keeps host weights in the plain layout; a
    // repacked baseline would run other kernels and differ in the last bits).
    [qwenPath, dsPath] = await Promise.all([makeFixtureModel(QWEN), makeFixtureModel({ ...DEEPSEEK_GROUPED, type: 'f16' })]);
    plain = await loadModel(qwenPath, base);
    dsPlain = await loadModel(dsPath, base);
    want.greedy = await outputs(plain, greedy);
    want.sampled = await outputs(plain, sampled);
    want.dsGreedy = await outputs(dsPlain, greedy);
    wantLogits = await logits(plain, PROMPTS[1]!);
    dsWantLogits = await logits(dsPlain, PROMPTS[1]!);
    heat = await plain.expertStats();
    dsHeat = await dsPlain.expertStats();
  });

  afterAll(async () => {
    await plain?.dispose();
    await dsPlain?.dispose();
  });

  it('copies the hottest experts by the given heat and leaves every output as it was', async () => {
    const model = await loadModel(qwenPath, { ...base, gpuExperts: 3, expertHeat: heat });
    try {
      const placement = await model.expertPlacement();
      expect(placement.layers.map((l) => l.layer)).toEqual([0, 1, 2]);
      expect(placement.layers.map((l) => l.experts)).toEqual(hottest(heat, 3));
      for (const l of placement.layers) expect(l.bytes).toBeGreaterThan(0);
      // Each expert's rows come from the same weights and kernel on either side: equal bit for bit.
      expect(await logits(model, PROMPTS[1]!)).toEqual(wantLogits);
      // Concurrent requests: rows of one micro-batch go to copies and to host experts alike.
      expect(await outputs(model, greedy)).toEqual(want.greedy);
      expect(await outputs(model, sampled)).toEqual(want.sampled);
      // The copies took the hottest experts' share of the same traffic, counted since the choice.
      const counted = await model.expertStats();
      const after = await model.expertPlacement();
      after.layers.forEach((l, i) => {
        const counts = counted.layers[i]!.counts;
        expect(l.routed).toBe(counted.layers[i]!.total);
        expect(l.routedToCopies).toBe(l.experts.reduce((sum, e) => sum + counts[e]!, 0));
        expect(l.routedToCopies).toBeGreaterThan(0);
        expect(l.routedToCopies).toBeLessThan(l.routed);
      });
    } finally {
      await model.dispose();
    }
  });

  it('skips copied experts on the host side in a DeepSeek-V3-shaped model (MLA, groups, sigmoid, scale)', async () => {
    const model = await loadModel(dsPath, { ...base, gpuExperts: 12, expertHeat: dsHeat });
    try {
      expect((await model.expertPlacement()).layers.map((l) => l.experts)).toEqual(hottest(dsHeat, 12));
      expect(await logits(model, PROMPTS[1]!)).toEqual(dsWantLogits);
      expect(await outputs(model, greedy)).toEqual(want.dsGreedy);
    } finally {
      await model.dispose();
    }
  });

  it('keeps host weights in the plain layout where the CPU would repack them (q4_0), so they can be split', async () => {
    const q4 = await makeFixtureModel({ ...QWEN, type: 'q4_0' });
    const model = await loadModel(q4, { ...base, gpuExperts: 3, expertHeat: heat });
    try {
      expect((await model.expertPlacement()).layers.map((l) => l.experts)).toEqual(hottest(heat, 3));
      expect((await model.complete(PROMPTS[0]!, greedy)).tokens).toHaveLength(greedy.maxTokens);
    } finally {
      await model.dispose();
    }
  });

  it('chooses again on placeExperts and every expertReplaceTokens, the output unchanged', async () => {
    const model = await loadModel(qwenPath, { ...base, gpuExperts: 2, expertReplaceTokens: 8 });
    try {
      // No heat at load: the first experts by id, until counts say otherwise.
      expect((await model.expertPlacement()).layers.map((l) => l.experts)).toEqual([
        [0, 1],
        [0, 1],
        [0, 1],
      ]);
      expect(await outputs(model, greedy)).toEqual(want.greedy);
      const counted = await model.expertStats();
      // Chosen again from the counts (the last choice was made within the final 8 tokens).
      const now = await model.expertPlacement();
      expect(now.error).toBeUndefined();
      expect(now.layers.some((l) => l.experts.join() !== '0,1')).toBe(true);
      // An explicit heat that outweighs everything counted picks exactly its experts.
      const loud = counted.layers.map((l) => ({ layer: l.layer, counts: l.counts.map((_, e) => (e === 5 ? 2e9 : e === 6 ? 1e9 : 0)) }));
      const placed = await model.placeExperts(loud);
      expect(placed.layers.map((l) => l.experts)).toEqual([
        [5, 6],
        [5, 6],
        [5, 6],
      ]);
      expect(placed.layers.every((l) => l.routed === 0)).toBe(true);
      expect(await outputs(model, { ...greedy, maxTokens: 4 })).toEqual(want.greedy!.map((t) => t.slice(0, 4)));
    } finally {
      await model.dispose();
    }
  });

  it('refuses what it cannot do with typed errors, and the model carries on', async () => {
    const dense = await makeFixtureModel({ arch: 'llama', nLayer: 2 });
    await expect(loadModel(dense, { ...base, cpuMoeLayers: 0, expertStats: false, gpuExperts: 2 })).rejects.toMatchObject({
      name: 'InvalidOptionError',
      option: 'gpuExperts',
    });
    // Counts that do not fit the model's layers.
    await expect(loadModel(qwenPath, { ...base, gpuExperts: 2, expertHeat: [{ layer: 0, counts: [1, 2, 3] }] })).rejects.toMatchObject({
      option: 'expertHeat',
    });
    await expect(loadModel(qwenPath, { ...base, gpuExperts: 2, expertHeat: [{ layer: 0, counts: [-1] }] })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(loadModel(qwenPath, { ...base, expertHeat: heat })).rejects.toMatchObject({ option: 'expertHeat' });
    await expect(loadModel(qwenPath, { ...base, expertStats: false, gpuExperts: 2, expertReplaceTokens: 64 })).rejects.toMatchObject({
      option: 'expertReplaceTokens',
    });
    await expect(plain.expertPlacement()).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(plain.placeExperts()).rejects.toBeInstanceOf(InvalidOptionError);

    const model = await loadModel(qwenPath, { ...base, gpuExperts: 2 });
    try {
      await expect(model.placeExperts([{ layer: 7, counts: [1] }])).rejects.toMatchObject({ name: 'InvalidOptionError' });
      expect((await model.complete(PROMPTS[0]!, greedy)).tokens).toEqual(want.greedy![0]);
    } finally {
      await model.dispose();
    }
    await expect(model.placeExperts()).rejects.toMatchObject({ name: 'DisposedError' });
  });
});
