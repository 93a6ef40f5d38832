/**
 * fusedMoeRouting (native/patches/0005-moe-group-topk.patch): a DeepSeek-V3-shaped model's
 * group-limited routing runs as one op, ggml_moe_group_topk, instead of build_moe_ffn's chain of
 * nine. The op picks the same experts in the same order, so everything downstream is computed the
 * same way: the same tokens, and the same expert counts in every layer, as upstream's chain.
 * (The op against the chain on random scores at real shapes: test/moe-route.test.ts.)
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { DEEPSEEK_GROUPED, makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

const load = { contextSize: 256, maxSequences: 4, threads: 2, expertStats: true, ...BATCH_INVARIANT } as const;
const greedy = { temperature: 0, ignoreEos: true, maxTokens: 32 } as const;
const PROMPTS = ['The river carried the boat', 'Numbers: 3, 1, 4, 1, 5, 9,', 'Once the engine starts', 'A list of colours: red,'];

describe('fused group-limited MoE routing (fusedMoeRouting)', { timeout: 180_000 }, () => {
  let chain: Model;
  let fused: Model;

  beforeAll(async () => {
    const path = await makeFixtureModel(DEEPSEEK_GROUPED);
    chain = await loadModel(path, load);
    fused = await loadModel(path, { ...load, fusedMoeRouting: true });
  });
  afterAll(async () => {
    await chain?.dispose();
    await fused?.dispose();
  });

  it('generates what upstream’s op chain generates, with the same experts counted in every layer', async () => {
    expect(chain.info.context.fusedMoeRouting).toBe(false);
    expect(fused.info.context.fusedMoeRouting).toBe(true);
    for (const p of PROMPTS) {
      const [a, b] = [await chain.complete(p, greedy), await fused.complete(p, greedy)];
      expect(b.tokens, p).toEqual(a.tokens);
      expect(b.text).toBe(a.text);
    }
    const [a, b] = [await chain.expertStats({ reset: true }), await fused.expertStats({ reset: true })];
    expect(b.layers.map((l) => Array.from(l.counts))).toEqual(a.layers.map((l) => Array.from(l.counts)));
    // Routing was spread out, not forced onto a few experts: several groups' experts were used.
    const used = a.layers[0]!.counts.flatMap((c, e) => (c > 0 ? [e] : []));
    expect(new Set(used.map((e) => Math.floor(e / 4))).size).toBeGreaterThan(3);
  });

  it('gives 4 concurrent requests their solo outputs', async () => {
    const solo: number[][] = [];
    for (const p of PROMPTS) solo.push((await fused.complete(p, greedy)).tokens);
    const together = await Promise.all(PROMPTS.map((p) => fused.complete(p, greedy)));
    expect(together.map((r) => r.tokens)).toEqual(solo);
  });

  it('leaves models without expert groups as they were, and refuses a non-boolean', async () => {
    const path = await makeFixtureModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 2, nEmbd: 64 });
    const plain = await loadModel(path, { contextSize: 128, maxSequences: 1, threads: 2, ...BATCH_INVARIANT });
    const flagged = await loadModel(path, { contextSize: 128, maxSequences: 1, threads: 2, fusedMoeRouting: true, ...BATCH_INVARIANT });
    try {
      expect((await flagged.complete('hello', greedy)).tokens).toEqual((await plain.complete('hello', greedy)).tokens);
    } finally {
      await plain.dispose();
      await flagged.dispose();
    }
    const error = await loadModel(path, { fusedMoeRouting: 'yes' as unknown as boolean }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InvalidOptionError);
    expect((error as InvalidOptionError).option).toBe('fusedMoeRouting');
  });
});
