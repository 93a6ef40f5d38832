import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { estimateMemory } from '../src/index.js';
import { serve, type ServeHandle } from '../src/server/serve.js';
import { makeFixtureModel } from './fixtures/models.js';

const MiB = 1024 ** 2;

describe('server over a runtime (--memory-budget): three models, room for two', () => {
  let handle: ServeHandle;
  const lines: string[] = [];
  // A budget of host memory: every layer on the CPU, on the CUDA build too.
  const load = { contextSize: 512, maxSequences: 2, threads: 1, gpuLayers: 0 };

  beforeAll(async () => {
    const paths = await Promise.all([1, 2, 3].map((seed) => makeFixtureModel({ arch: 'llama', type: 'q8_0', seed })));
    const sizes = await Promise.all(paths.map(async (p) => (await estimateMemory(p, load)).total));
    handle = await serve({
      models: paths.map((path, i) => ({ name: ['a', 'b', 'c'][i]!, path })),
      load,
      memoryBudget: Math.max(...sizes) * 2 + MiB,
      port: 0,
      handleSignals: false,
      log: (line) => lines.push(line),
    });
  });
  afterAll(() => handle?.stop());

  const complete = (model: string) =>
    fetch(`${handle.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, prompt: 'hello', max_tokens: 3, ignore_eos: true }),
    });
  const models = async () => ((await (await fetch(`${handle.url}/v1/models`)).json()) as { data: Array<{ id: string; meta: Record<string, unknown> }> }).data;

  it('loads what fits at start and says so', () => {
    expect(lines.some((l) => /^loaded a \(/.test(l))).toBe(true);
    expect(lines.some((l) => /^c \(.*\) does not fit beside the models already loaded: it loads on its first request/.test(l))).toBe(true);
    expect(lines.some((l) => /^memory budget: \d+ of \d+ MiB on CPU/.test(l))).toBe(true);
  });

  it('answers every model, unloading the least recently used idle one, and reloads it on demand', async () => {
    for (const name of ['a', 'b', 'c', 'a']) {
      const r = await complete(name);
      expect(r.status, await r.clone().text()).toBe(200);
      expect(((await r.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens).toBe(3);
    }
    const byId = Object.fromEntries((await models()).map((m) => [m.id, m.meta]));
    expect(byId['a']).toMatchObject({ state: 'ready', loads: 2, unloads: 1 });
    expect(byId['b']).toMatchObject({ state: 'unloaded', loads: 1, unloads: 1 });
    expect(byId['c']).toMatchObject({ state: 'ready', loads: 1 });
    expect((byId['b']!['memory_bytes'] as Record<string, number>)['CPU']).toBeGreaterThan(MiB);
    // An unloaded model is still healthy: its next request loads it.
    const health = await fetch(`${handle.url}/health`);
    expect(health.status).toBe(200);
  });

  it('exports memory per model and device, loads and unloads', async () => {
    const text = await (await fetch(`${handle.url}/metrics`)).text();
    expect(text).toMatch(/genesis_model_memory_bytes\{model="a",device="CPU"\} [1-9]\d+/);
    expect(text).toMatch(/genesis_model_memory_bytes\{model="b",device="CPU"\} 0/);
    expect(text).toMatch(/genesis_model_loaded\{model="b"\} 0/);
    expect(text).toMatch(/genesis_model_loads_total\{model="a"\} 2/);
    expect(text).toMatch(/genesis_model_unloads_total\{model="b"\} 1/);
    expect(text).toMatch(/genesis_memory_budget_bytes\{device="CPU"\} \d+/);
    expect(text).toMatch(/genesis_memory_used_bytes\{device="CPU"\} \d+/);
  });
});
