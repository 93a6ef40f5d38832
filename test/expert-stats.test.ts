/**
 * Expert-load statistics (native/patches/0003): per MoE layer and expert, the tokens routed there,
 * counted inside each step's graph and read between steps.
 *
 * - A DeepSeek-V3-shaped fixture whose selection bias forces every token onto four experts: the
 *   counts are known exactly (the first layer sees every decoded token; the last only the rows
 *   whose output is needed, as llama.cpp skips the others there).
 * - A qwen3moe fixture with ordinary (softmax) routing: each layer's picks add up to tokens ×
 *   experts used, under concurrency too; counting changes no output; reset zeroes.
 * - Misuse: a dense model, a model loaded without the option, a disposed model.
 * - The server exports the counts on /metrics.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { DisposedError, InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { serve } from '../src/server/serve.js';
import { makeFixtureModel } from './fixtures/models.js';

const THREADS = 2;
// Layer placement and counts are the same on a GPU build; CPU keeps the run cheap.
const load = { contextSize: 256, maxSequences: 4, threads: THREADS, expertStats: true } as const;

const HOT = [1, 2, 9, 10]; // in groups 0 and 2: the two groups kept
const DEEPSEEK = {
  arch: 'deepseek2',
  type: 'q8_0',
  nLayer: 3,
  nEmbd: 128,
  nHead: 2,
  headDim: 96,
  nExpert: 16,
  nExpertUsed: 4,
  nFfExp: 32,
  mla: { kvLoraRank: 64, qLoraRank: 96 },
  expertGroups: { count: 4, used: 2 },
  expertBias: Array.from({ length: 16 }, (_, e) => (HOT.includes(e) ? 50 : 0)),
} as const;

const greedy = { temperature: 0, ignoreEos: true } as const;

describe('expert statistics', { timeout: 120_000 }, () => {
  let deepseek: Model;
  let qwen: Model;
  let qwenPlain: Model;

  beforeAll(async () => {
    const [dsPath, qwenPath] = await Promise.all([
      makeFixtureModel(DEEPSEEK),
      makeFixtureModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 3, nEmbd: 64 }),
    ]);
    deepseek = await loadModel(dsPath, load);
    qwen = await loadModel(qwenPath, load);
    qwenPlain = await loadModel(qwenPath, { ...load, expertStats: false });
  });

  afterAll(async () => {
    await deepseek?.dispose();
    await qwen?.dispose();
    await qwenPlain?.dispose();
  });

  it('counts exactly where the routing is known: every token on the biased experts, in every layer', async () => {
    const before = await deepseek.expertStats({ reset: true });
    expect(before.layers.map((l) => l.layer)).toEqual([0, 1, 2]);
    const r = await deepseek.complete('Once upon a time there was', { ...greedy, maxTokens: 12 });
    const stats = await deepseek.expertStats();
    expect(stats).toMatchObject({ experts: 16, expertsUsed: 4 });
    // Decoded: the prompt, then every generated token but the last.
    const decoded = r.usage.promptTokens + r.usage.completionTokens - 1;
    const expected = (n: number) => Array.from({ length: 16 }, (_, e) => (HOT.includes(e) ? n : 0));
    expect(stats.layers[0]!.counts).toEqual(expected(decoded));
    expect(stats.layers[1]!.counts).toEqual(expected(decoded));
    // The last layer computes only rows with an output: the prompt's last, then each step's one.
    expect(stats.layers[2]!.counts).toEqual(expected(r.usage.completionTokens));
    expect(stats.layers[0]!.total).toBe(decoded * 4);
    expect(stats.layers[0]!.imbalance).toBe(4); // 16 experts, 4 take everything
  });

  it('adds up to tokens × experts used with softmax routing, across concurrent requests', async () => {
    await qwen.expertStats({ reset: true });
    const decodedBefore = qwen.stats().decodedTokens;
    const prompts = ['1, 2, 3, 4, 5', 'The quick brown fox jumps over', 'Hello', 'A much longer prompt that spans several words and tokens'];
    const results = await Promise.all(prompts.map((p, i) => qwen.complete(p, { ...greedy, maxTokens: 6 + i })));
    const stats = await qwen.expertStats();
    const decoded = qwen.stats().decodedTokens - decodedBefore;
    const used = qwen.info.expertsUsed;
    expect(stats.layers).toHaveLength(3);
    for (const layer of stats.layers.slice(0, 2)) expect(layer.total).toBe(decoded * used);
    // The last layer: one row per generated token that was decoded plus each prompt's last.
    const outputs = results.reduce((n, r) => n + r.usage.completionTokens, 0);
    expect(stats.layers[2]!.total).toBe(outputs * used);
    // Real routing spreads: more than the 'used' experts got tokens, and no count exceeds the tokens.
    for (const layer of stats.layers) {
      expect(layer.counts.filter((c) => c > 0).length).toBeGreaterThan(used);
      expect(Math.max(...layer.counts)).toBeLessThanOrEqual(decoded);
      expect(layer.imbalance).toBeGreaterThanOrEqual(1);
    }
  });

  it('counts the hybrid Qwen3.5-MoE shape (DeltaNet and attention layers alike route their FFN)', async () => {
    const m = await loadModel(
      await makeFixtureModel({ arch: 'qwen35moe', type: 'q8_0', nLayer: 4, nEmbd: 128, nHead: 4, nHeadKv: 2, headDim: 32, nExpert: 16, nExpertUsed: 4, nFfExp: 64 }),
      { ...load, maxSequences: 2 },
    );
    try {
      await Promise.all(['Hello world', 'Once upon a time'].map((p) => m.complete(p, { ...greedy, maxTokens: 8 })));
      const stats = await m.expertStats();
      const decoded = m.stats().decodedTokens;
      expect(stats.layers.map((l) => l.layer)).toEqual([0, 1, 2, 3]);
      for (const layer of stats.layers.slice(0, 3)) expect(layer.total).toBe(decoded * 4);
      expect(stats.layers[3]!.total).toBeLessThanOrEqual(decoded * 4);
      expect(stats.layers[3]!.total).toBeGreaterThan(0);
    } finally {
      await m.dispose();
    }
  });

  it('changes no output, and reset zeroes the counters after the read', async () => {
    const prompts = ['Counting experts', 'does not change', 'what the model writes'];
    const counted = await Promise.all(prompts.map((p) => qwen.complete(p, { ...greedy, maxTokens: 10 })));
    const plain = await Promise.all(prompts.map((p) => qwenPlain.complete(p, { ...greedy, maxTokens: 10 })));
    expect(counted.map((r) => r.tokens)).toEqual(plain.map((r) => r.tokens));
    const read = await qwen.expertStats({ reset: true });
    expect(read.layers[0]!.total).toBeGreaterThan(0);
    const after = await qwen.expertStats();
    expect(after.layers.every((l) => l.total === 0 && l.counts.every((c) => c === 0))).toBe(true);
  });

  it('refuses where there is nothing to count, naming the option', async () => {
    const dense = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const refused = await loadModel(dense, load).then(
      async (m) => {
        await m.dispose();
        return undefined;
      },
      (e: unknown) => e,
    );
    expect(refused).toBeInstanceOf(InvalidOptionError);
    expect(refused).toMatchObject({ option: 'expertStats' });
    expect(String((refused as Error).message)).toMatch(/no routed experts/);
    await expect(qwenPlain.expertStats()).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(loadModel(dense, { ...load, expertStats: 'yes' as unknown as boolean })).rejects.toBeInstanceOf(InvalidOptionError);
  });

  it('a read waiting on a model that is disposed settles, and later reads say disposed', async () => {
    const m = await loadModel(await makeFixtureModel(DEEPSEEK), { ...load, maxSequences: 1 });
    const generation = m.complete('A long generation', { ...greedy, maxTokens: 200 }).catch((e: unknown) => e);
    const read = m.expertStats().then(
      (s) => s.layers.length,
      (e: unknown) => e,
    );
    await m.dispose();
    const outcome = await read;
    expect(outcome === 3 || outcome instanceof Error).toBe(true);
    expect(await generation).toBeDefined();
    await expect(m.expertStats()).rejects.toBeInstanceOf(DisposedError);
  });

  it('exports the counts and each layer’s imbalance on /metrics', async () => {
    const handle = await serve({
      models: [{ name: 'ds', path: await makeFixtureModel(DEEPSEEK) }],
      load,
      port: 0,
      handleSignals: false,
      log: () => {},
    });
    try {
      const r = await fetch(`${handle.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'ds', prompt: 'hello there', max_tokens: 4, ignore_eos: true }),
      });
      expect(r.status).toBe(200);
      const text = await (await fetch(`${handle.url}/metrics`)).text();
      expect(text).toMatch(/^genesis_expert_tokens_total\{model="ds",layer="0",expert="9"\} [1-9]\d*$/m);
      expect(text).toMatch(/^genesis_expert_tokens_total\{model="ds",layer="2",expert="0"\} 0$/m);
      expect(text).toMatch(/^genesis_expert_load_imbalance\{model="ds",layer="1"\} 4$/m);
    } finally {
      await handle.stop();
    }
  });
});
