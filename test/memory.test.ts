import { spawnSync } from 'node:child_process';
import { beforeAll, describe, expect, it } from 'vitest';

import {
  createRuntime, estimateMemory, InvalidOptionError, loadModel, MemoryBudgetError, planMemory, type MemoryEstimate,
} from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';

const MiB = 1024 ** 2;

describe('estimateMemory', () => {
  it('is within 10% of what loading really takes (RSS growth, weights read, compute buffer used)', async () => {
    // ~120 MiB of Q8_0 weights, so that Node's own RSS noise stays small next to it.
    const path = await makeFixtureModel({ arch: 'llama', nEmbd: 1024, nHead: 8, nHeadKv: 8, nFf: 2816, nLayer: 4, type: 'q8_0' });
    // Host memory (gpuLayers 0): RSS is what is measured, and the CUDA build would offload the weights.
    const options = { contextSize: 1024, maxSequences: 4, batchSize: 128, threads: 1, useMmap: false, gpuLayers: 0 };
    const probe = new URL('./fixtures/rss-probe.ts', import.meta.url).pathname;
    const r = spawnSync(process.execPath, ['--import', 'tsx', probe, path, JSON.stringify(options)], { encoding: 'utf8', timeout: 120_000 });
    expect(r.status, r.stderr).toBe(0);
    const { estimate, rss, devices } = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { estimate: number; rss: number; devices: MemoryEstimate['devices'] };
    expect(devices[0]).toMatchObject({ device: 'CPU', host: true });
    expect(devices[0]!.weights).toBeGreaterThan(100 * MiB);
    // KV: 4 layers × 1024 × 4 cells × (K + V) × 1024 × 2 bytes (F16).
    expect(devices[0]!.kvCache).toBe(4 * 4096 * 2 * 1024 * 2);
    expect(Math.abs(rss / estimate - 1)).toBeLessThan(0.1);
  });

  it('scales the KV cache with the context and rejects bad input with typed errors', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const small = await estimateMemory(path, { contextSize: 256, maxSequences: 2, threads: 1 });
    const large = await estimateMemory(path, { contextSize: 1024, maxSequences: 2, threads: 1 });
    expect(large.devices[0]!.kvCache).toBe(4 * small.devices[0]!.kvCache);
    expect(large.devices[0]!.weights).toBe(small.devices[0]!.weights);
    expect(large.kvBytesPerToken).toBe(small.kvBytesPerToken);
    expect(small.contextCells).toBe(512);
    await expect(estimateMemory('/nonexistent/model.gguf')).rejects.toMatchObject({ code: 'MODEL_NOT_FOUND' });
    await expect(estimateMemory(path, { contextSize: -1 })).rejects.toBeInstanceOf(InvalidOptionError);
  });
});

describe('planMemory and loadModel({ memoryBudget })', () => {
  let path: string;
  let full: MemoryEstimate;
  beforeAll(async () => {
    path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    full = await estimateMemory(path, { contextSize: 4096, maxSequences: 4, threads: 1, gpuLayers: 0 });
  });

  it('keeps the asked context when it fits, and says so', async () => {
    const plan = await planMemory(path, { contextSize: 4096, maxSequences: 4, threads: 1, gpuLayers: 0, memoryBudget: full.total + MiB });
    expect(plan.options.contextSize).toBe(4096);
    expect(plan.explanation.join('\n')).toMatch(/contextSize 4096 × 4 sequences as asked/);
    expect(plan.estimate.total).toBe(full.total);
  });

  it('halves the context until it fits a smaller budget, and loads with the plan', async () => {
    const budget = full.total - full.devices[0]!.kvCache / 2; // room for at most half the KV cache
    const plan = await planMemory(path, { contextSize: 4096, maxSequences: 4, threads: 1, gpuLayers: 0, memoryBudget: budget });
    expect(plan.options.contextSize).toBe(2048);
    expect(plan.estimate.total).toBeLessThanOrEqual(budget);
    expect(plan.explanation[0]).toMatch(/contextSize 2048 instead of the 4096 asked for/);
    const model = await loadModel(path, { contextSize: 4096, maxSequences: 4, threads: 1, gpuLayers: 0, memoryBudget: budget });
    try {
      expect(model.info.context.contextSize).toBe(2048);
      expect(model.plan?.options.contextSize).toBe(2048);
      expect((await model.complete('fits', { maxTokens: 3, ignoreEos: true })).usage.completionTokens).toBe(3);
    } finally {
      await model.dispose();
    }
  });

  it('names the device and the shortfall when nothing fits', async () => {
    const error = await planMemory(path, { contextSize: 4096, threads: 1, gpuLayers: 0, memoryBudget: 4 * MiB }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(MemoryBudgetError);
    const e = error as MemoryBudgetError;
    expect(e.code).toBe('MEMORY_BUDGET');
    expect(e.device).toBe('CPU');
    expect(e.budget).toBe(4 * MiB);
    expect(e.needed).toBeGreaterThan(e.budget);
    expect(e.message).toMatch(/even at contextSize 512 it needs .* on CPU, over the 4\.0 MiB budget by/);
    await expect(planMemory(path, { memoryBudget: -5 })).rejects.toMatchObject({ code: 'INVALID_OPTION', option: 'memoryBudget' });
    await expect(planMemory(path, { memoryBudget: { host: Number.NaN } })).rejects.toMatchObject({ option: 'memoryBudget.host' });
  });
});

describe('runtime: several models under one budget', () => {
  // Budgets of host memory: every layer on the CPU, on the CUDA build too.
  const load = { contextSize: 512, maxSequences: 2, threads: 1, gpuLayers: 0 };
  let paths: string[];
  let sizes: number[];
  beforeAll(async () => {
    // Three different models of similar size.
    paths = await Promise.all([1, 2, 3].map((seed) => makeFixtureModel({ arch: 'llama', type: 'q8_0', seed })));
    sizes = await Promise.all(paths.map(async (p) => (await estimateMemory(p, load)).total));
  });
  const budgetForTwo = () => Math.max(...sizes) * 2 + MiB; // < three models

  it('serves three models under a budget for two: the idle one is unloaded and reloaded on demand', async () => {
    const runtime = createRuntime({ memoryBudget: budgetForTwo() });
    try {
      ['a', 'b', 'c'].forEach((name, i) => runtime.register(name, paths[i]!, load));
      for (const name of ['a', 'b', 'c', 'a', 'b']) {
        const r = await runtime.complete(name, `hello ${name}`, { maxTokens: 4, ignoreEos: true, temperature: 0 });
        expect(r.usage.completionTokens).toBe(4);
        const used = runtime.usage().find((u) => u.device === 'CPU')!;
        expect(used.used).toBeLessThanOrEqual(used.budget);
      }
      const s = Object.fromEntries(runtime.status().map((x) => [x.name, x]));
      // a, b, c (unloads a, least recently used), a (unloads b), b (unloads c).
      expect(s['a']!.loads).toBe(2);
      expect(s['a']!.unloads).toBe(1);
      expect(s['c']!.loads).toBe(1);
      expect(Object.values(s).filter((x) => x.state === 'loaded')).toHaveLength(2);
      // Requests to two resident models run side by side.
      const both = await Promise.all(['a', 'b'].map((n) => runtime.complete(n, 'together', { maxTokens: 3, ignoreEos: true })));
      expect(both.map((r) => r.usage.completionTokens)).toEqual([3, 3]);
    } finally {
      await runtime.dispose();
    }
  });

  it('never unloads a model in use: a load waits for one to become idle', async () => {
    const runtime = createRuntime({ memoryBudget: budgetForTwo() });
    try {
      ['a', 'b', 'c'].forEach((name, i) => runtime.register(name, paths[i]!, load));
      const a = await runtime.acquire('a');
      const b = await runtime.acquire('b');
      let cLoaded = false;
      const c = runtime.acquire('c').then((lease) => {
        cLoaded = true;
        return lease;
      });
      await new Promise((r) => setTimeout(r, 300));
      expect(cLoaded).toBe(false);
      expect(runtime.loaded('a')).toBe(a.model);
      expect(a.model.disposed).toBe(false);
      b.release();
      const lease = await c;
      expect((await lease.model.complete('c', { maxTokens: 2, ignoreEos: true })).usage.completionTokens).toBe(2);
      expect(runtime.status().find((x) => x.name === 'b')!.state).toBe('unloaded');
      expect(a.model.disposed).toBe(false);
      a.release();
      lease.release();
    } finally {
      await runtime.dispose();
    }
  });

  it('loads a model once when many ask for it at the same time', async () => {
    const runtime = createRuntime({ memoryBudget: budgetForTwo() });
    try {
      runtime.register('a', paths[0]!, load);
      const leases = await Promise.all([runtime.acquire('a'), runtime.acquire('a'), runtime.load('a').then(() => runtime.acquire('a'))]);
      expect(new Set(leases.map((l) => l.model)).size).toBe(1);
      expect(runtime.status()[0]!.loads).toBe(1);
      leases.forEach((l) => l.release());
    } finally {
      await runtime.dispose();
    }
  });

  it('unloads an idle model after its keep-alive, and fails clearly when a model cannot fit at all', async () => {
    const runtime = createRuntime({ memoryBudget: budgetForTwo() });
    try {
      runtime.register('a', paths[0]!, { ...load, keepAlive: 50 });
      await runtime.complete('a', 'x', { maxTokens: 1 });
      await new Promise((r) => setTimeout(r, 400));
      expect(runtime.status()[0]).toMatchObject({ state: 'unloaded', unloads: 1 });
      runtime.register('huge', paths[1]!, { ...load, contextSize: 1 << 16, maxSequences: 16 });
      const error = await runtime.complete('huge', 'x', { maxTokens: 1 }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(MemoryBudgetError);
      expect((error as Error).message).toMatch(/model huge needs .* on CPU but the runtime's budget there is/);
      // The failure touched nothing else: a still loads and runs.
      expect((await runtime.complete('a', 'again', { maxTokens: 2, ignoreEos: true })).usage.completionTokens).toBe(2);
      expect(() => runtime.register('a', paths[0]!)).toThrow(InvalidOptionError);
      await expect(runtime.acquire('nobody')).rejects.toBeInstanceOf(InvalidOptionError);
    } finally {
      await runtime.dispose();
    }
    await expect(runtime.acquire('a')).rejects.toMatchObject({ code: 'DISPOSED' });
  });
});
