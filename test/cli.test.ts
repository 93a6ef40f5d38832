import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Model } from '../src/index.js';
import { GPU } from './fixtures/gpu.js';
import { makeFixtureModel } from './fixtures/models.js';

const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;

function genesis(...args: string[]) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', cli, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('genesis CLI', () => {
  let path: string;
  let model: Model;

  beforeAll(async () => {
    path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    model = await loadModel(path, { contextSize: 256, maxSequences: 1, threads: 1 });
  });
  afterAll(() => model.dispose());

  it('generate streams the same greedy text as the API', async () => {
    const expected = await model.complete('The command line', { maxTokens: 12, temperature: 0 });
    const r = genesis('generate', '--model', path, '--prompt', 'The command line', '--max-tokens', '12', '--temperature', '0', '--threads', '1');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe(`${expected.text}\n`);
    expect(r.stderr).toMatch(/\[length\] 4 prompt tokens .* 12 generated/);
  });

  it('plan prints memory per device, fits a budget, and names the shortfall when nothing fits', () => {
    // The host layout (--gpu-layers 0; a CUDA build would otherwise put the layers on the GPU).
    const r = genesis('plan', path, '--context-size', '1024', '--max-sequences', '2', '--threads', '1', '--gpu-layers', '0');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/contextSize 1024 × 2 sequences, KV [\d.]+ KiB per token\n {2}CPU +[\d.]+ MiB {2}layers 0-1 \+ output; weights [\d.]+ MiB, KV cache [\d.]+ MiB, compute [\d.]+ MiB/);
    const json = JSON.parse(genesis('plan', path, '--context-size', '1024', '--max-sequences', '2', '--threads', '1', '--gpu-layers', '0', '--json').stdout);
    const fitted = genesis('plan', path, '--context-size', '1024', '--max-sequences', '2', '--threads', '1', '--gpu-layers', '0', '--memory-budget', String(json.total - json.devices[0].kvCache / 2));
    expect(fitted.status, fitted.stderr).toBe(0);
    expect(fitted.stdout).toMatch(/plan: contextSize 512, gpuLayers 0/);
    // --cache-type-k/-v: an f32 cache takes twice f16's bytes; a type that is not one is named.
    const f32 = JSON.parse(genesis('plan', path, '--context-size', '1024', '--max-sequences', '2', '--threads', '1', '--gpu-layers', '0', '--cache-type-k', 'f32', '--cache-type-v', 'f32', '--json').stdout);
    expect(f32.devices[0].kvCache).toBe(2 * json.devices[0].kvCache);
    const typo = genesis('plan', path, '--threads', '1', '--gpu-layers', '0', '--cache-type-v', 'q8');
    expect(typo.status).toBe(1);
    expect(typo.stderr).toMatch(/kvCacheType/);
    const checkpoints = genesis('plan', path, '--threads', '1', '--gpu-layers', '0', '--state-checkpoints', '65');
    expect(checkpoints.status).toBe(1);
    expect(checkpoints.stderr).toMatch(/stateCheckpoints/);
    const memory = genesis('plan', path, '--threads', '1', '--gpu-layers', '0', '--state-checkpoint-memory', 'lots');
    expect(memory.status).toBe(2);
    expect(memory.stderr).toMatch(/--state-checkpoint-memory expects a size/);
    const none = genesis('plan', path, '--memory-budget', '1M', '--threads', '1', '--gpu-layers', '0');
    expect(none.status).toBe(1);
    expect(none.stderr).toMatch(/^genesis: MEMORY_BUDGET: .* over the 1\.0 MiB budget by/);
  });

  it('info describes the model', () => {
    const r = genesis('info', path, '--gpu-layers', '0');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/architecture\s+llama/);
    expect(r.stdout).toMatch(/vocab\s+32000/);
    const json = genesis('info', path, '--json', '--gpu-layers', '0');
    const info = JSON.parse(json.stdout);
    expect(info.architecture).toBe('llama');
    expect(info.layers).toBe(2);
    expect(info.metadata['general.architecture']).toBe('llama');
    // What sits where: everything in host memory on a CPU build without --rpc.
    expect(r.stdout).toMatch(/placement\n {2}CPU +[\d.]+ MiB {2}layers 0-1 \+ output; weights/);
    expect(info.placement.splitMode).toBe('layer');
    expect(info.placement.devices[0]).toMatchObject({ device: 'CPU', kind: 'cpu', host: true, layers: [0, 1], output: true });
    if (GPU) {
      // By default a CUDA build puts every layer and the output on the GPU.
      expect(genesis('info', path).stdout).toMatch(/\n {2}CUDA0 +[\d.]+ MiB {2}layers 0-1 \+ output; weights/);
    }
  });

  it('bad input gives a clear message and a non-zero exit, never a crash', () => {
    const missing = genesis('generate', '--model', '/nonexistent/model.gguf', '--prompt', 'x');
    expect(missing.status).toBe(1);
    expect(missing.stderr).toContain('MODEL_NOT_FOUND');
    expect(missing.stderr).toContain('/nonexistent/model.gguf');
    const usage = genesis('generate', '--prompt', 'x');
    expect(usage.status).toBe(2);
    expect(usage.stderr).toContain('generate needs --model');
    const unknown = genesis('frobnicate');
    expect(unknown.status).toBe(2);
    const badOption = genesis('generate', '--model', path, '--prompt', 'x', '--temperature=-3');
    expect(badOption.status).toBe(1);
    expect(badOption.stderr).toContain('INVALID_OPTION');
    expect(badOption.stderr).toContain('temperature');
  });
});
