/**
 * Speculative decoding in the batching engine: a draft model proposes tokens, the target checks
 * them in one batched decode. The output must be the target's own: greedy token for token, and
 * sampled with a seed the same draws as without a draft.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { estimateMemory, GenesisError, InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { serve } from '../src/server/serve.js';
import { formatSpeculativeTable, measureSpeculative, parseSpeculativeSimple } from '../src/bench/speculative.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

describe('speculative decoding', () => {
  let targetPath: string;
  let target: Model;
  let same: Model; // the target's own file as draft: it agrees with every greedy choice
  let small: Model; // a different, smaller model with the same tokenizer: it agrees now and then
  let withSame: Model;
  let withSmall: Model;
  // "Exactly the target's own output" compares runs whose batches differ (drafts verified together,
  // sequences alone and in a batch), bit for bit: CPU (fixtures/gpu.ts).
  const options = { contextSize: 512, maxSequences: 4, batchSize: 128, threads: 1, ...BATCH_INVARIANT };
  const prompts = ['Once upon a time', 'The quick brown fox', 'In the beginning', 'Hello there'];

  beforeAll(async () => {
    targetPath = await makeFixtureModel({ arch: 'llama', type: 'f16', nLayer: 4 });
    const smallPath = await makeFixtureModel({ arch: 'llama', type: 'f16', nLayer: 1, seed: 77 });
    target = await loadModel(targetPath, options);
    same = await loadModel(targetPath, options);
    small = await loadModel(smallPath, options);
    withSame = await loadModel(targetPath, { ...options, draft: { model: same, maxTokens: 4 } });
    withSmall = await loadModel(targetPath, { ...options, draft: { model: small, maxTokens: 3 } });
  });
  afterAll(async () => {
    for (const m of [withSame, withSmall, target, same, small]) await m?.dispose();
  });

  const greedy = { maxTokens: 40, temperature: 0, ignoreEos: true };

  it('greedy output equals the target alone, token for token, with several sequences at once', async () => {
    const alone = await Promise.all(prompts.map((p) => target.complete(p, greedy)));
    for (const model of [withSame, withSmall]) {
      const drafted = await Promise.all(prompts.map((p) => model.complete(p, greedy)));
      drafted.forEach((r, i) => {
        expect(r.tokens).toEqual(alone[i]!.tokens);
        expect(r.text).toBe(alone[i]!.text);
        expect(r.speculative!.draftTokens).toBeGreaterThan(0);
        expect(r.speculative!.acceptedTokens).toBeLessThanOrEqual(r.speculative!.draftTokens);
      });
    }
  });

  it('a draft that agrees saves target steps: the same model is accepted throughout', async () => {
    const before = withSame.stats();
    const r = await withSame.complete(prompts[0]!, greedy);
    const after = withSame.stats();
    expect(r.speculative!.acceptanceRate).toBeGreaterThan(0.9);
    // 40 tokens in about 40 / (1 + 4) target steps (+1 for the prompt), instead of 40.
    expect(after.steps - before.steps).toBeLessThanOrEqual(12);
    expect(after.acceptedDraftTokens - before.acceptedDraftTokens).toBe(r.speculative!.acceptedTokens);
    expect(after.draftTokens - before.draftTokens).toBe(r.speculative!.draftTokens);
  });

  it('drafts less for a sequence whose drafts keep being rejected', async () => {
    // The 1-layer random draft almost never agrees: the draft length halves to 0, then one token is
    // tried again every 16 steps, instead of 3 drafted tokens every step (~120 for 40 tokens).
    const r = await withSmall.complete(prompts[0]!, greedy);
    expect(r.speculative!.acceptanceRate).toBeLessThan(0.2);
    expect(r.speculative!.draftTokens).toBeLessThan(20);
  });

  it('sampled output with a seed is the target’s own draw at every position', async () => {
    // The draws are the same random numbers in the same order with or without drafts. With flash
    // attention on, llama.cpp's CPU kernel for several tokens of a sequence in one decode rounds
    // differently from its one-token kernel (f16 intermediates), which moves a draw across a token
    // boundary now and then (measured: 2 runs in 12 differ from position 14 or 26); with it off
    // the logits are the same and so is every draw.
    const fa = { ...options, flashAttention: false };
    const plain = await loadModel(targetPath, fa);
    const drafting = await loadModel(targetPath, { ...fa, draft: { model: small, maxTokens: 3 } });
    try {
      for (const seed of [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) {
        const sampled = { maxTokens: 30, temperature: 1, topK: 8, topP: 1, minP: 0, seed, ignoreEos: true };
        expect((await drafting.complete(prompts[1]!, sampled)).tokens).toEqual((await plain.complete(prompts[1]!, sampled)).tokens);
      }
    } finally {
      await drafting.dispose();
      await plain.dispose();
    }
  });

  it('keeps stop strings, maxTokens and penalties exact', async () => {
    const alone = await target.complete(prompts[2]!, { ...greedy, maxTokens: 7, repeatPenalty: 1.3, presencePenalty: 0.5 });
    const drafted = await withSame.complete(prompts[2]!, { ...greedy, maxTokens: 7, repeatPenalty: 1.3, presencePenalty: 0.5 });
    expect(drafted.tokens).toEqual(alone.tokens);
    expect(drafted.usage.completionTokens).toBe(7);
    const stop = alone.text.slice(5, 9);
    if (stop.trim().length > 0) {
      const a = await target.complete(prompts[2]!, { ...greedy, stop });
      const b = await withSame.complete(prompts[2]!, { ...greedy, stop });
      expect(b.text).toBe(a.text);
      expect(b.finishReason).toBe('stop');
    }
  });

  it('is off per request with draft: false', async () => {
    const r = await withSame.complete(prompts[3]!, { ...greedy, draft: false });
    expect(r.speculative).toBeUndefined();
    expect(r.tokens).toEqual((await target.complete(prompts[3]!, greedy)).tokens);
    await expect(withSame.complete('x', { draft: { maxTokens: 65 } })).rejects.toBeInstanceOf(InvalidOptionError);
  });

  it('refuses a draft with another tokenizer, a draft in deterministic mode, and disposing a draft in use', async () => {
    const other = await loadModel(await makeFixtureModel({ arch: 'qwen3moe' }), { contextSize: 256, maxSequences: 1, threads: 1 });
    try {
      const error = await loadModel(targetPath, { ...options, draft: { model: other } }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(InvalidOptionError);
      expect(error).toMatchObject({ option: 'draft' });
      expect((error as Error).message).toMatch(/tokenizer differs/);
    } finally {
      await other.dispose();
    }
    await expect(loadModel(targetPath, { ...options, deterministic: true, draft: { model: same } })).rejects.toMatchObject({ option: 'draft' });
    await expect(loadModel(targetPath, { ...options, draft: { model: other } })).rejects.toMatchObject({ option: 'draft.model' });

    const draft = await loadModel(targetPath, { ...options, maxSequences: 1 });
    const user = await loadModel(targetPath, { ...options, draft: { model: draft } });
    const refused = await draft.dispose().catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(GenesisError);
    expect(refused).toMatchObject({ code: 'MODEL_IN_USE' });
    expect((await draft.complete('still here', { maxTokens: 2, temperature: 0 })).usage.completionTokens).toBe(2);
    await user.dispose();
    await draft.dispose();
  });

  it('genesis serve --draft: the same completions, and the draft figures in /metrics', async () => {
    const handle = await serve({
      models: [{ name: 't', path: targetPath, draft: { path: targetPath, maxTokens: 4 } }],
      load: options,
      port: 0,
      handleSignals: false,
      log: () => {},
    });
    try {
      const r = await fetch(`${handle.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 't', prompt: prompts[0], max_tokens: 24, temperature: 0 }),
      });
      expect(r.status).toBe(200);
      const body = (await r.json()) as { choices: Array<{ text: string }> };
      expect(body.choices[0]!.text).toBe((await target.complete(prompts[0]!, { maxTokens: 24, temperature: 0 })).text);
      const metrics = await (await fetch(`${handle.url}/metrics`)).text();
      const accepted = Number(/genesis_draft_accepted_tokens_total\{model="t"\} (\d+)/.exec(metrics)?.[1]);
      const drafted = Number(/genesis_draft_tokens_total\{model="t"\} (\d+)/.exec(metrics)?.[1]);
      expect(drafted).toBeGreaterThan(0);
      expect(accepted).toBeGreaterThan(0);
      expect(accepted).toBeLessThanOrEqual(drafted);
    } finally {
      await handle.stop();
    }
  });

  it('genesis serve refuses --draft with --memory-budget, before loading anything', async () => {
    await expect(
      serve({ models: [{ name: 't', path: targetPath, draft: { path: targetPath } }], memoryBudget: 2 ** 30, port: 0, handleSignals: false, log: () => {} }),
    ).rejects.toThrow(/--draft FILE is not available with --memory-budget/);
  });

});

describe('speculative decoding with the model’s own MTP layers', () => {
  // GLM-4.5-shaped (sigmoid-routed MoE with a shared expert) with one nextn block. Quiet layers make
  // the trunk nearly a bigram model, which the MTP block (identity on its embedding half) predicts
  // one token further; its hidden-state half (mtpStateScale) makes the drafts depend on the
  // target's hidden states too.
  let path: string;
  let plain: Model;
  let mtp: Model;
  // "Exactly the target's own output" compares runs whose batches differ (drafts verified together,
  // sequences alone and in a batch), bit for bit: CPU (fixtures/gpu.ts).
  const options = { contextSize: 512, maxSequences: 4, batchSize: 128, threads: 1, ...BATCH_INVARIANT };
  const greedy = { maxTokens: 32, temperature: 0, ignoreEos: true };
  // Different lengths: with one KV stream per sequence llama.cpp regroups such a batch's tokens.
  const prompts = ['Once upon a time there was a', 'The quick brown fox', 'In the beginning God created the heaven and the earth.', 'Hi'];

  beforeAll(async () => {
    path = await makeFixtureModel({
      arch: 'glm4moe',
      type: 'f16',
      nLayer: 2,
      mtpLayers: 1,
      mtpStateScale: 4,
      quietLayers: { from: 0, scale: 0.05 },
    });
    plain = await loadModel(path, options);
    mtp = await loadModel(path, { ...options, draft: { mtp: true, maxTokens: 4 } });
  });
  afterAll(async () => {
    for (const m of [mtp, plain]) await m?.dispose();
  });

  it('greedy output equals the model alone, token for token, with several sequences at once', async () => {
    const alone = await Promise.all(prompts.map((p) => plain.complete(p, greedy)));
    const drafted = await Promise.all(prompts.map((p) => mtp.complete(p, greedy)));
    drafted.forEach((r, i) => {
      expect(r.tokens).toEqual(alone[i]!.tokens);
      expect(r.speculative!.draftTokens).toBeGreaterThan(0);
    });
    const total = drafted.reduce((n, r) => n + r.speculative!.acceptedTokens, 0);
    expect(total).toBeGreaterThan(0);
  });

  it('drafts the same in a batch as alone: each draft reads its own token’s hidden state', async () => {
    // The drafts depend on the target's hidden states (mtpStateScale): a state taken from another
    // token of the batch would change them, and with them the acceptance figures.
    const solo = [];
    for (const p of prompts) solo.push((await mtp.complete(p, greedy)).speculative);
    const together = (await Promise.all(prompts.map((p) => mtp.complete(p, greedy)))).map((r) => r.speculative);
    expect(together).toEqual(solo);
  });

  it('accepts more drafts the closer the trunk is to what the MTP block predicts', async () => {
    const rate = async (scale: number): Promise<number> => {
      const p = await makeFixtureModel({ arch: 'glm4moe', type: 'f16', nLayer: 2, mtpLayers: 1, quietLayers: { from: 0, scale } });
      const m = await loadModel(p, { ...options, draft: { mtp: true, maxTokens: 4 } });
      try {
        const rs = await Promise.all(prompts.map((q) => m.complete(q, greedy)));
        const drafted = rs.reduce((n, r) => n + r.speculative!.draftTokens, 0);
        return rs.reduce((n, r) => n + r.speculative!.acceptedTokens, 0) / drafted;
      } finally {
        await m.dispose();
      }
    };
    const quiet = await rate(0.05);
    const loud = await rate(1);
    expect(quiet).toBeGreaterThan(0.8);
    expect(loud).toBeLessThan(quiet);
  });

  it('sampled output with a seed is the model’s own draw at every position', async () => {
    // Flash attention off: see the same test with a draft model above.
    const fa = { ...options, flashAttention: false };
    const a = await loadModel(path, fa);
    const b = await loadModel(path, { ...fa, draft: { mtp: true, maxTokens: 3 } });
    try {
      for (const seed of [1, 2, 3, 4, 5]) {
        const sampled = { maxTokens: 24, temperature: 1, topK: 8, seed, ignoreEos: true };
        expect((await b.complete(prompts[1]!, sampled)).tokens).toEqual((await a.complete(prompts[1]!, sampled)).tokens);
      }
    } finally {
      await b.dispose();
      await a.dispose();
    }
  });

  it('reuses a cached prompt prefix and still matches the model alone', async () => {
    const first = await mtp.complete(prompts[2]!, greedy);
    const before = mtp.stats().cachedPromptTokens;
    const longer = `${prompts[2]!}${first.text} And`;
    const r = await mtp.complete(longer, greedy);
    expect(mtp.stats().cachedPromptTokens).toBeGreaterThan(before);
    expect(r.tokens).toEqual((await plain.complete(longer, greedy)).tokens);
  });

  it('counts the MTP layers, their KV cache and compute buffers: in estimateMemory and in the loaded model’s placement', async () => {
    const without = await estimateMemory(path, options);
    const withMtp = await estimateMemory(path, { ...options, draft: { mtp: true } });
    const [a, b] = [without.devices[0]!, withMtp.devices[0]!];
    expect(b.weights).toBeGreaterThan(a.weights); // the nextn block is loaded only for drafting
    expect(b.kvCache).toBeGreaterThan(a.kvCache);
    expect(b.compute).toBeGreaterThan(a.compute);
    const loaded = mtp.info.placement!.devices[0]!;
    expect({ weights: loaded.weights, kvCache: loaded.kvCache, compute: loaded.compute }).toEqual({ weights: b.weights, kvCache: b.kvCache, compute: b.compute });
  });

  it('genesis serve --draft mtp: the same completions, and the draft figures in /metrics', async () => {
    const handle = await serve({ models: [{ name: 'g', path, draft: { mtp: true, maxTokens: 3 } }], load: options, port: 0, handleSignals: false, log: () => {} });
    try {
      const r = await fetch(`${handle.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'g', prompt: prompts[0], max_tokens: 16, temperature: 0 }),
      });
      const body = (await r.json()) as { choices: Array<{ text: string }> };
      expect(body.choices[0]!.text).toBe((await plain.complete(prompts[0]!, { maxTokens: 16, temperature: 0 })).text);
      const metrics = await (await fetch(`${handle.url}/metrics`)).text();
      expect(Number(/genesis_draft_tokens_total\{model="g"\} (\d+)/.exec(metrics)?.[1])).toBeGreaterThan(0);
    } finally {
      await handle.stop();
    }
  });

  it('refuses MTP drafting for a model without nextn layers, and malformed draft options', async () => {
    const llama = await makeFixtureModel({ arch: 'llama', type: 'f16', nLayer: 1 });
    const error = await loadModel(llama, { ...options, draft: { mtp: true } }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InvalidOptionError);
    expect(error).toMatchObject({ option: 'draft.mtp' });
    expect((error as Error).message).toMatch(/no multi-token-prediction/);
    await expect(loadModel(path, { ...options, draft: { mtp: false } as never })).rejects.toMatchObject({ option: 'draft.mtp' });
    await expect(loadModel(path, { ...options, draft: {} as never })).rejects.toMatchObject({ option: 'draft' });
    await expect(loadModel(path, { ...options, deterministic: true, draft: { mtp: true } })).rejects.toMatchObject({ option: 'draft' });
  });
});

describe('speculative decoding benchmark', () => {
  it('reads llama-speculative-simple’s summary', () => {
    const text = [
      'encoded    9 tokens in    0.012 seconds, speed:  750.000 t/s',
      'decoded   24 tokens in    0.133 seconds, speed:  180.451 t/s',
      '',
      'n_draft   = 4',
      'n_predict = 24',
      'n_drafted = 52',
      'n_accept  = 14',
      'accept    = 26.923%',
    ].join('\n');
    expect(parseSpeculativeSimple(text)).toEqual({ tokensPerSecond: 180.451, drafted: 52, accepted: 14 });
    expect(() => parseSpeculativeSimple('nothing')).toThrow(/could not read/);
  });

  it('measures ours and llama-speculative-simple on the same models; agreement falls as the target’s later layers grow', async () => {
    const lines: string[] = [];
    const r = await measureSpeculative({
      target: { preset: 'tiny', type: 'q8_0', layers: 4 }, scales: [0, 1], draftTokens: 4, genTokens: 24, threads: 1, gpuLayers: 0, repeat: 1,
      log: (line) => lines.push(line),
    });
    expect(r.rows.map((row) => row.scale)).toEqual([0, 1]);
    // Scale 0: the later layers add nothing, the 1-layer draft is always right, in both runtimes.
    expect(r.rows[0]!.acceptance).toEqual({ ours: 1, reference: 1 });
    expect(r.rows[1]!.acceptance.ours).toBeLessThan(0.9);
    for (const row of r.rows) {
      expect(row.alone).toBeGreaterThan(0);
      expect(row.ours).toBeGreaterThan(0);
      expect(row.reference).toBeGreaterThan(0);
    }
    expect(lines.join('\n')).not.toContain('WARNING');
    expect(formatSpeculativeTable(r)).toMatch(/^\| 0 \| 100 % \/ 100 % \|/m);
  });

  it('measures MTP drafting against llama-speculative-simple --spec-type draft-mtp', async () => {
    const lines: string[] = [];
    const r = await measureSpeculative({
      target: { preset: 'tiny-mtp', type: 'f16', layers: 2 }, scales: [0.02, 1], draftTokens: 3, genTokens: 24, threads: 1, gpuLayers: 0, repeat: 1, mtp: true,
      log: (line) => lines.push(line),
    });
    expect(r.mtp).toBe(true);
    // Nearly silent layers: the MTP block predicts what the model does, in both runtimes.
    expect(r.rows[0]!.acceptance.ours).toBeGreaterThan(0.8);
    expect(r.rows[0]!.acceptance.reference).toBeGreaterThan(0.8);
    expect(r.rows[1]!.acceptance.ours).toBeLessThan(r.rows[0]!.acceptance.ours);
    for (const row of r.rows) expect(Math.min(row.alone, row.ours, row.reference)).toBeGreaterThan(0);
    expect(lines.join('\n')).not.toContain('WARNING');
    expect(formatSpeculativeTable(r)).toContain('its own MTP layer');
  });
});
