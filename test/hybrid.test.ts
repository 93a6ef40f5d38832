/**
 * A Qwen3.5-shaped hybrid model (three Gated DeltaNet layers, then one gated-attention layer): its
 * recurrent state cannot be cut back to an arbitrary position as a KV cache can, which the prompt
 * cache and speculative decoding both do. The engine must notice and stay exact.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { loadModel, type Model } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';

const shape = { arch: 'qwen35', type: 'f16', nLayer: 4, nEmbd: 64, nHead: 4, nHeadKv: 2, headDim: 16, nFf: 128 } as const;
const options = { contextSize: 256, maxSequences: 4, threads: 1 };
const greedy = { maxTokens: 24, temperature: 0, ignoreEos: true };
const prompts = ['Once upon a time', 'The quick brown fox jumps', 'Hello', 'In the beginning was the word'];

describe('hybrid recurrent models (Qwen3.5 shape)', () => {
  let path: string;
  let plain: Model;

  beforeAll(async () => {
    path = await makeFixtureModel({ ...shape, mtpLayers: 1, quietLayers: { from: 0, scale: 0.05 } });
    plain = await loadModel(path, options);
  });
  afterAll(async () => {
    await plain?.dispose();
  });

  it('loads as hybrid and generates the same in a batch as alone', async () => {
    expect(plain.info.hybrid).toBe(true);
    const solo = [];
    for (const p of prompts) solo.push((await plain.complete(p, greedy)).tokens);
    const together = await Promise.all(prompts.map((p) => plain.complete(p, greedy)));
    expect(together.map((r) => r.tokens)).toEqual(solo);
  });

  it('a prompt sharing a cached prefix gets the output of a fresh model: the state is not cut back, it is rebuilt', async () => {
    const m = await loadModel(path, { ...options, maxSequences: 1 });
    const fresh = await loadModel(path, { ...options, maxSequences: 1 });
    try {
      const first = await m.complete(prompts[1]!, greedy);
      const next = `${prompts[1]!}${first.text} and`;
      expect((await m.complete(next, greedy)).tokens).toEqual((await fresh.complete(next, greedy)).tokens);
    } finally {
      await fresh.dispose();
      await m.dispose();
    }
  });

  it('speculative decoding rolls the recurrent state back over rejected drafts: output equals the model alone', async () => {
    // A draft whose layers differ more: it is often wrong, so states are rolled back often.
    const draft = await loadModel(await makeFixtureModel({ ...shape, quietLayers: { from: 0, scale: 0.4 } }), options);
    const target = await loadModel(path, { ...options, draft: { model: draft, maxTokens: 3 } });
    try {
      const alone = await Promise.all(prompts.map((p) => plain.complete(p, greedy)));
      const drafted = await Promise.all(prompts.map((p) => target.complete(p, greedy)));
      drafted.forEach((r, i) => expect(r.tokens).toEqual(alone[i]!.tokens));
      const proposed = drafted.reduce((n, r) => n + r.speculative!.draftTokens, 0);
      const kept = drafted.reduce((n, r) => n + r.speculative!.acceptedTokens, 0);
      expect(kept).toBeGreaterThan(0);
      expect(kept).toBeLessThan(proposed);
    } finally {
      await target.dispose();
      await draft.dispose();
    }
  });

  it('drafts with its own MTP layer, exactly and mostly accepted', async () => {
    const mtp = await loadModel(path, { ...options, draft: { mtp: true, maxTokens: 3 } });
    try {
      const alone = await Promise.all(prompts.map((p) => plain.complete(p, greedy)));
      const drafted = await Promise.all(prompts.map((p) => mtp.complete(p, greedy)));
      drafted.forEach((r, i) => expect(r.tokens).toEqual(alone[i]!.tokens));
      const proposed = drafted.reduce((n, r) => n + r.speculative!.draftTokens, 0);
      const kept = drafted.reduce((n, r) => n + r.speculative!.acceptedTokens, 0);
      expect(kept / proposed).toBeGreaterThan(0.8);
    } finally {
      await mtp.dispose();
    }
  });
});
