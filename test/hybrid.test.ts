/**
 * A Qwen3.5-shaped hybrid model (three Gated DeltaNet layers, then one gated-attention layer): its
 * recurrent state cannot be cut back to an arbitrary position as a KV cache can, which the prompt
 * cache and speculative decoding both do. The engine must notice and stay exact.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { serve } from '../src/server/serve.js';
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

  it('restarts a prompt sharing part of the cache from a copy of the recurrent state, with the output of a fresh model', async () => {
    // Copies every batchSize (16) prompt tokens: a 50-token prompt leaves copies after 16, 32 and 48.
    const ids = (seed: number, n: number) => Array.from({ length: n }, (_, i) => 100 + ((seed * 7919 + i * 104729) % 5000));
    const system = ids(1, 40);
    const first = [...system, ...ids(2, 10)];
    const second = [...system, ...ids(3, 12)];
    const load = { ...options, maxSequences: 1, batchSize: 16 };
    // Layers at full strength (the suite's model has quiet ones for its MTP): the output depends on
    // the state, so a wrong copy shows.
    const loud = await makeFixtureModel(shape);
    const fresh = await loadModel(loud, { ...load, promptCache: false });
    // Sampled with a seed: a different state shifts the probabilities, and some draws with them.
    const sampled = { maxTokens: 48, temperature: 1.5, seed: 7, ignoreEos: true };
    const third = [...system, ...ids(4, 9)];
    const expected = (await fresh.complete(second, sampled)).tokens;
    const greedyAlone = [(await fresh.complete(second, greedy)).tokens, (await fresh.complete(third, greedy)).tokens];
    await fresh.dispose();

    let oneCopy = 0;
    const m = await loadModel(loud, load);
    const without = await loadModel(loud, { ...load, stateCheckpoints: 0 });
    try {
      for (const model of [m, without]) await model.complete(first, greedy);
      // Copies after 16, 32 and 48 tokens, one sequence's state each.
      oneCopy = m.stats().stateCheckpointBytes / 3;
      expect(Number.isInteger(oneCopy) && oneCopy > 0).toBe(true);
      expect(without.stats().stateCheckpointBytes).toBe(0);
      const [before, beforeWithout] = [m.stats(), without.stats()];
      expect((await m.complete(second, sampled)).tokens).toEqual(expected);
      expect((await without.complete(second, sampled)).tokens).toEqual(expected);
      const [after, afterWithout] = [m.stats(), without.stats()];
      // The 40 shared tokens: restarted from the copy after 32 of them, the rest computed.
      expect(after.stateCheckpointRestores - before.stateCheckpointRestores).toBe(1);
      expect(after.cachedPromptTokens - before.cachedPromptTokens).toBe(32);
      // Without copies the state cannot go back: all of it is computed again.
      expect(afterWithout.cachedPromptTokens - beforeWithout.cachedPromptTokens).toBe(0);
      expect(afterWithout.stateCheckpointRestores).toBe(0);
    } finally {
      await Promise.all([m.dispose(), without.dispose()]);
    }

    // Another sequence starts from the copy too: two requests at once with the same system prompt,
    // one in the cached slot, the other copying that slot's cells up to 32 and its state copy there.
    // Batched, this hybrid model's sampled draws are not those of solo runs (see test/kv-pool's
    // hybrid case), so the outputs are compared greedy; the copy itself is the restore above.
    const pair = await loadModel(loud, { ...load, maxSequences: 2 });
    try {
      await pair.complete(first, greedy);
      const before = pair.stats();
      const got = await Promise.all([second, third].map((p) => pair.complete(p, greedy)));
      const after = pair.stats();
      expect(got.map((r) => r.tokens)).toEqual(greedyAlone);
      expect(after.sharedPrefixCopies - before.sharedPrefixCopies).toBe(1);
      expect(after.cachedPromptTokens - before.cachedPromptTokens).toBe(64);
      // The cached slot went back to its copy. The other restored the copied one too, unless the
      // first had not decoded yet when it was admitted: its state then sat at 32 itself.
      expect(after.stateCheckpointRestores - before.stateCheckpointRestores).toBeGreaterThanOrEqual(1);
    } finally {
      await pair.dispose();
    }
    // A memory limit under two copies: only the newest (after 48 tokens) stays, so the second
    // prompt, which shares 40, finds none to restart from.
    const tight = await loadModel(loud, { ...load, stateCheckpointMemory: 1 });
    try {
      await tight.complete(first, greedy);
      const held = tight.stats();
      expect(held.stateCheckpointBytes).toBe(oneCopy);
      expect((await tight.complete(second, sampled)).tokens).toEqual(expected);
      expect(tight.stats().cachedPromptTokens - held.cachedPromptTokens).toBe(0);
      expect(tight.stats().stateCheckpointRestores).toBe(0);
    } finally {
      await tight.dispose();
    }
    for (const [option, value] of [['stateCheckpoints', -1], ['stateCheckpointMemory', 0]] as const) {
      const error = await loadModel(path, { ...load, [option]: value }).catch((e: unknown) => e);
      expect((error as InvalidOptionError).option).toBe(option);
    }

    // The server: two chats with one system prompt; the second restarts from the first's copy.
    const handle = await serve({ models: [{ name: 'hybrid', path: loud }], load, port: 0, handleSignals: false, log: () => {} });
    try {
      const system = 'You are a careful assistant. Answer briefly, in plain words, and never invent facts.\n';
      for (const question of ['What is a river?', 'Why is the sky blue?']) {
        const r = await fetch(`${handle.url}/v1/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: 'hybrid', prompt: system + question, max_tokens: 4, temperature: 0 }),
        });
        expect(r.status).toBe(200);
      }
      const text = await (await fetch(`${handle.url}/metrics`)).text();
      expect(text).toMatch(/^genesis_state_checkpoint_restores_total\{model="hybrid"\} 1$/m);
      expect(text).toMatch(/^genesis_state_checkpoint_bytes\{model="hybrid"\} [1-9]\d*$/m);
    } finally {
      await handle.stop();
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
