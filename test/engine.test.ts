import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Model } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';

describe('engine thread', () => {
  let model: Model;

  beforeAll(async () => {
    model = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'q8_0' }), { contextSize: 2048, maxSequences: 2, threads: 1 });
  });
  afterAll(() => model.dispose());

  it('keeps generating while the JS thread is blocked, and delivers the backlog coalesced', async () => {
    const run = model.generate('The engine runs on its own thread', { maxTokens: 2000, temperature: 0, ignoreEos: true });
    const iterator = run[Symbol.asyncIterator]();
    const first = await iterator.next();
    expect(first.done).toBe(false);
    const before = model.stats().steps;
    // Block the JS thread (no event loop turn, so no token callback can run) until the engine has
    // made several steps on its own: polling stats() is a synchronous native call.
    const deadline = performance.now() + 30_000;
    while (model.stats().steps < before + 5 && performance.now() < deadline) {
      // busy
    }
    expect(model.stats().steps).toBeGreaterThanOrEqual(before + 5);
    // The running sequence holds its prompt and every token decoded so far.
    expect(model.stats().kvUsedTokens).toBeGreaterThanOrEqual(8 + 5);
    // Everything produced meanwhile arrives in one callback (uv async, poll phase, before the
    // check phase's setImmediate) and waits as one chunk: many tokens, not one chunk per step.
    await new Promise((resolve) => setImmediate(resolve));
    const next = await iterator.next();
    expect(next.value!.tokens.length).toBeGreaterThan(1);
    await iterator.return!();
    await expect(run.result).rejects.toMatchObject({ code: 'ABORTED' });
  });

  it('counts one decode per step across sequences', async () => {
    const start = model.stats();
    const runs = [0, 1].map((i) => model.complete(`sequence ${i}`, { maxTokens: 20, temperature: 0, ignoreEos: true }));
    const results = await Promise.all(runs);
    const end = model.stats();
    const steps = end.steps - start.steps;
    const tokens = end.decodedTokens - start.decodedTokens;
    const prompt = results.reduce((n, r) => n + r.usage.promptTokens, 0);
    // Every decoded token is a prompt token or a generated token fed back (the last sampled one is
    // not decoded), less the prompt tokens the slots' prompt cache already held (here the BOS the
    // previous test's prompt began with).
    const cached = end.cachedPromptTokens - start.cachedPromptTokens;
    expect(tokens).toBe(prompt - cached + results.reduce((n, r) => n + r.usage.completionTokens - 1, 0));
    // Two sequences in flight together: far fewer steps than tokens.
    expect(steps).toBeLessThan(tokens);
    expect(end.active).toBe(0);
    expect(end.queued).toBe(0);
    expect(end.kvUsedTokens).toBe(0);
    expect(end.kvCapacityTokens).toBe(2048 * 2);
  });
});
