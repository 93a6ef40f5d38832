/**
 * Models split over llama.cpp RPC servers (issue: multi-GPU split and RPC). Two `genesis rpc-server`
 * processes on 127.0.0.1 lend their CPU as remote devices; the model runs partly here, partly there.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

import { createRuntime, estimateMemory, InvalidOptionError, loadModel, planMemory, RpcError, type Model } from '../src/index.js';
import { toApiError } from '../src/server/errors.js';
import { makeFixtureModel, repoRoot } from './fixtures/models.js';

const cli = join(repoRoot(), 'src', 'cli', 'main.ts');

// These tests lend CPUs: the local side and both servers (children inherit the environment) see no
// GPU, on a CUDA machine too, so the split is the one the assertions describe. Set before the addon
// loads (vi.hoisted runs ahead of the imports).
vi.hoisted(() => {
  process.env['CUDA_VISIBLE_DEVICES'] = '';
});

/** A port nothing listens on right now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** `genesis rpc-server` on 127.0.0.1:port; resolves once it says it listens. */
function rpcServer(port: number): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', cli, 'rpc-server', '--port', String(port), '--threads', '1'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  return new Promise((resolve, reject) => {
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (stderr.includes('listening on')) resolve(child);
    });
    child.once('exit', (code) => reject(new Error(`rpc-server on ${port} exited with ${code}: ${stderr}`)));
  });
}

function stop(child: ChildProcess | undefined): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', () => resolve());
    child.kill('SIGKILL');
  });
}

describe('RPC split', () => {
  let path: string;
  let local: Model;
  let ports: number[];
  let servers: ChildProcess[];
  let endpoints: string[];
  const options = { contextSize: 256, maxSequences: 2, batchSize: 64, threads: 1 };
  const greedy = { maxTokens: 16, temperature: 0, ignoreEos: true };
  const prompt = 'Once upon a time';
  let reference: number[];

  beforeAll(async () => {
    // F16: the same kernels here and on the servers (quantized types may be repacked locally only).
    path = await makeFixtureModel({ arch: 'llama', type: 'f16', nLayer: 4 });
    ports = [await freePort(), await freePort()];
    endpoints = ports.map((p) => `127.0.0.1:${p}`);
    servers = await Promise.all(ports.map(rpcServer));
    local = await loadModel(path, options);
    reference = (await local.complete(prompt, greedy)).tokens;
  });
  afterAll(async () => {
    await local?.dispose();
    await Promise.all((servers ?? []).map(stop));
  });

  it('splits a model over the local CPU and two RPC servers with output equal to the local run, token for token', async () => {
    // 3 of the 5 offloadable layers (4 + output) go to the servers: layers 0-1 stay here, layer 2
    // goes to the first server, layer 3 and the output layer to the second.
    const split = await loadModel(path, { ...options, rpcServers: endpoints, gpuLayers: 3, tensorSplit: [1, 2] });
    try {
      const devices = split.info.placement.devices;
      expect(devices.map((d) => [d.kind, d.description])).toEqual([
        ['cpu', expect.any(String)],
        ['rpc', endpoints[0]],
        ['rpc', endpoints[1]],
      ]);
      // Every device holds layers, and together they hold each layer once.
      expect(devices.every((d) => d.layers.length > 0)).toBe(true);
      expect(devices.flatMap((d) => d.layers).sort()).toEqual([0, 1, 2, 3]);
      expect(devices.map((d) => d.layers)).toEqual([[0, 1], [2], [3]]);
      expect(devices.filter((d) => d.output).map((d) => d.kind)).toEqual(['rpc']);
      expect(devices[1]!.weights).toBeGreaterThan(0);
      expect(split.info.placement).toMatchObject({ splitMode: 'layer', tensorSplit: [1, 2], rpcServers: endpoints });

      expect((await split.complete(prompt, greedy)).tokens).toEqual(reference);
      // Two sequences at once through the same connections.
      const both = await Promise.all([split.complete(prompt, greedy), split.complete(`${prompt}, there`, greedy)]);
      expect(both[0]!.tokens).toEqual(reference);
      expect(both[1]!.tokens).toEqual((await local.complete(`${prompt}, there`, greedy)).tokens);
    } finally {
      await split.dispose();
    }
  });

  it("runs the split modes llama.cpp supports over RPC devices: 'none' on one device, 'tensor' parallel", async () => {
    const none = await loadModel(path, { ...options, rpcServers: endpoints, splitMode: 'none', mainGpu: 1 });
    try {
      const held = none.info.placement.devices.filter((d) => d.layers.length > 0);
      expect(held.map((d) => d.description)).toEqual([endpoints[1]]);
      expect((await none.complete(prompt, greedy)).tokens).toEqual(reference);
    } finally {
      await none.dispose();
    }
    const tensor = await loadModel(path, { ...options, rpcServers: endpoints, splitMode: 'tensor' });
    try {
      expect(tensor.info.placement.devices.map((d) => d.kind)).toEqual(['cpu', 'meta']);
      expect((await tensor.complete(prompt, greedy)).tokens).toEqual(reference);
    } finally {
      await tensor.dispose();
    }
  });

  it('refuses options that do not fit the devices, naming them', async () => {
    const fail = (o: object) => loadModel(path, { ...options, rpcServers: endpoints, ...o }).then(() => undefined, (e: unknown) => e);
    const tooMany = await fail({ tensorSplit: [1, 1, 1] });
    expect(tooMany).toBeInstanceOf(InvalidOptionError);
    expect(tooMany).toMatchObject({ option: 'tensorSplit' });
    expect((tooMany as Error).message).toContain(endpoints[1]);
    expect(await fail({ splitMode: 'none', mainGpu: 2 })).toMatchObject({ code: 'INVALID_OPTION', option: 'mainGpu' });
    expect(await fail({ splitMode: 'row' })).toMatchObject({ code: 'INVALID_OPTION', option: 'splitMode' });
    expect(await fail({ splitMode: 'diagonal' })).toMatchObject({ code: 'INVALID_OPTION', option: 'splitMode' });
    for (const bad of [['127.0.0.1'], ['127.0.0.1:0'], ['127.0.0.1:70000'], [endpoints[0], endpoints[0]], 'host:1']) {
      await expect(loadModel(path, { ...options, rpcServers: bad as string[] })).rejects.toMatchObject({ code: 'INVALID_OPTION', option: 'rpcServers' });
    }
  });

  it('gives a typed error for a server that is not there, quickly', async () => {
    const nobody = `127.0.0.1:${await freePort()}`;
    const started = Date.now();
    const error = await loadModel(path, { ...options, rpcServers: [nobody] }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RpcError);
    expect(error).toMatchObject({ code: 'RPC_UNREACHABLE' });
    expect((error as Error).message).toContain(nobody);
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  it('plans per-device budgets: the layers split in proportion to them', async () => {
    const MiB = 2 ** 20;
    const plan = await planMemory(path, { ...options, rpcServers: endpoints, memoryBudget: { devices: { [endpoints[0]!]: 96 * MiB, RPC1: 32 * MiB } } });
    expect(plan.options.tensorSplit).toEqual([0.75, 0.25]);
    expect(plan.options.gpuLayers).toBe('max');
    expect(plan.explanation.join('\n')).toContain(endpoints[0]);
    await expect(planMemory(path, { ...options, rpcServers: endpoints, memoryBudget: { devices: { CUDA7: MiB } } })).rejects.toMatchObject({
      option: 'memoryBudget.devices.CUDA7',
    });
  });

  it('plans expert placement on an offload device (moePlacement experts): copies of the hottest experts there, output unchanged', async () => {
    const moe = await makeFixtureModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 3, nEmbd: 64 }); // 8 experts
    const on = { ...options, rpcServers: [endpoints[1]!] };
    const device = (e: { devices: Array<{ kind: string; weights: number; total: number }> }) => e.devices.find((d) => d.kind === 'rpc')!;
    const all = device(await estimateMemory(moe, { ...on, gpuLayers: 'max' }));
    const hosted = device(await estimateMemory(moe, { ...on, gpuLayers: 'max', cpuMoeLayers: 3 }));
    // Room for 60 % of the experts: --n-cpu-moe would keep two of the three layers' experts here.
    // By endpoint: the device's name (RPC0, RPC1, ...) follows the order the process first met servers in.
    const memoryBudget = { devices: { [endpoints[1]!]: hosted.total + 0.6 * (all.weights - hosted.weights) } };
    const byLayers = await planMemory(moe, { ...on, memoryBudget });
    expect(byLayers.options).toMatchObject({ gpuLayers: 'max', cpuMoeLayers: 2 });
    const plan = await planMemory(moe, { ...on, memoryBudget, moePlacement: 'experts' });
    expect(plan.options).toMatchObject({ gpuLayers: 'max', cpuMoeLayers: 3 });
    expect(plan.options.gpuExperts).toBeGreaterThanOrEqual(2);
    expect(plan.options.gpuExperts).toBeLessThan(8);
    expect(plan.explanation.join('\n')).toMatch(/copies of its \d+ hottest of 8/);

    const plain = await loadModel(moe, { ...options, cpuMoeLayers: 3 });
    const want = (await plain.complete(prompt, greedy)).tokens;
    await plain.dispose();
    const placed = await loadModel(moe, { ...on, memoryBudget, moePlacement: 'experts', expertStats: true });
    try {
      expect(placed.plan?.options.gpuExperts).toBe(plan.options.gpuExperts);
      expect((await placed.complete(prompt, greedy)).tokens).toEqual(want);
      const { layers } = await placed.expertPlacement();
      expect(layers.map((l) => l.experts.length)).toEqual([0, 1, 2].map(() => plan.options.gpuExperts));
      expect(layers.every((l) => l.routedToCopies > 0 && l.routedToCopies < l.routed)).toBe(true);
      // The copies are weights on the server's device.
      const rpc = placed.info.placement.devices.find((d) => d.kind === 'rpc')!;
      expect(rpc.weights).toBeGreaterThan(hosted.weights);
    } finally {
      await placed.dispose();
    }
  });

  it('a server busy with another client (it serves one at a time) is a typed error in the other process, not a hang', async () => {
    const holder = await loadModel(path, { ...options, rpcServers: [endpoints[0]!] });
    try {
      const started = Date.now();
      const r = await new Promise<{ status: number | null; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, ['--import', 'tsx', cli, 'info', path, '--rpc', endpoints[0]!], { stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
        child.once('exit', (status) => resolve({ status, stderr }));
      });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain('RPC_UNREACHABLE');
      expect(r.stderr).toContain('one client at a time');
      expect(Date.now() - started).toBeLessThan(60_000);
      // The holder was never disturbed.
      expect((await holder.complete(prompt, greedy)).tokens).toEqual(reference);
    } finally {
      await holder.dispose();
    }
  });

  it('benchmarks the same split for ours and llama.cpp’s tools (genesis bench --rpc)', () => {
    const out = mkdtempSync(join(tmpdir(), 'genesis-bench-rpc-'));
    try {
      const r = spawnSync(
        process.execPath,
        ['--import', 'tsx', cli, 'bench', '--model', 'tiny:f16:2', '--workloads', 'single', '--repeat', '1', '--pp', '16', '--tg', '4',
          '--threads', '1', '--gpu-layers', '99', '--rpc', endpoints.join(','), '--tensor-split', '1,1', '--no-roofline', '--out', out],
        { encoding: 'utf8', timeout: 300_000 },
      );
      expect(r.status, r.stderr.slice(-2000)).toBe(0);
      // Both sides were given the servers.
      expect(r.stderr).toMatch(/llama-bench.*--rpc 127\.0\.0\.1:\d+,127\.0\.0\.1:\d+ -ts 1\/1/);
      const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8'));
      expect(report.settings.split).toEqual({ rpcServers: endpoints, tensorSplit: [1, 1] });
      const rows = report.runs[0].single;
      expect(rows.length).toBe(2);
      for (const row of rows) {
        expect(row.ours).toBeGreaterThan(0);
        expect(row.reference).toBeGreaterThan(0);
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('a server killed mid-generation fails that model’s requests with RpcError; the process and other models carry on; a reload works once it is back', async () => {
    const split = await loadModel(path, { ...options, rpcServers: endpoints, gpuLayers: 3 });
    let tokens = 0;
    const long = split.generate(prompt, { maxTokens: 10_000, temperature: 0, ignoreEos: true });
    const other = split.complete(`${prompt}, there`, { maxTokens: 10_000, temperature: 0, ignoreEos: true });
    const failure = (async () => {
      for await (const chunk of long) {
        tokens += chunk.tokens.length;
        if (tokens >= 4 && servers[1]!.exitCode === null && servers[1]!.signalCode === null) void stop(servers[1]);
      }
    })().catch((e: unknown) => e);
    const error = await failure;
    expect(error).toBeInstanceOf(RpcError);
    expect(error).toMatchObject({ code: 'RPC_DISCONNECTED' });
    expect((error as Error).message).toContain(endpoints[1]);
    await expect(other).rejects.toMatchObject({ code: 'RPC_DISCONNECTED' });
    // Later requests on that model get the same error at once; a model without RPC is untouched.
    await expect(split.complete(prompt, greedy)).rejects.toMatchObject({ code: 'RPC_DISCONNECTED' });
    await expect(split.embed('text')).rejects.toMatchObject({ code: 'RPC_DISCONNECTED' });
    expect((await local.complete(prompt, greedy)).tokens).toEqual(reference);
    await split.dispose();

    // While it is down, loading fails with the typed error; once it is back, the same split works.
    await expect(loadModel(path, { ...options, rpcServers: endpoints, gpuLayers: 3 })).rejects.toMatchObject({ code: 'RPC_UNREACHABLE' });
    servers[1] = await rpcServer(ports[1]!);
    const again = await loadModel(path, { ...options, rpcServers: endpoints, gpuLayers: 3 });
    try {
      expect((await again.complete(prompt, greedy)).tokens).toEqual(reference);
    } finally {
      await again.dispose();
    }
  });
});

describe('RPC split in a runtime', () => {
  it('unloads a model whose server was lost once its requests end, answers 503 meanwhile, and reloads it when the server is back', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'f16', nLayer: 4 });
    const port = await freePort();
    let server = await rpcServer(port);
    const runtime = createRuntime({ memoryBudget: { host: 8 * 2 ** 30, devices: { [`127.0.0.1:${port}`]: 2 ** 30 } } });
    const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true };
    try {
      runtime.register('split', path, { contextSize: 256, maxSequences: 2, batchSize: 64, threads: 1, rpcServers: [`127.0.0.1:${port}`], gpuLayers: 3 });
      const first = await runtime.complete('split', 'Once upon a time', greedy);
      await stop(server);
      const error = await runtime.complete('split', 'Once upon a time', greedy).catch((e: unknown) => e);
      expect(error).toMatchObject({ code: 'RPC_DISCONNECTED' });
      const api = toApiError(error);
      expect(api.status).toBe(503);
      expect(api.headers?.['retry-after']).toBeDefined();
      // Its last lease ended: unloaded, so the next request loads it again.
      await expect.poll(() => runtime.statusOf('split').state).toBe('unloaded');
      await expect(runtime.complete('split', 'Once upon a time', greedy)).rejects.toMatchObject({ code: 'RPC_UNREACHABLE' });
      server = await rpcServer(port);
      expect((await runtime.complete('split', 'Once upon a time', greedy)).tokens).toEqual(first.tokens);
      expect(runtime.statusOf('split').loads).toBe(2);
    } finally {
      await runtime.dispose();
      await stop(server);
    }
  });
});

describe('genesis rpc-server', () => {
  it('refuses a non-loopback address without --allow-remote, and warns with it', async () => {
    const refused = spawnSync(process.execPath, ['--import', 'tsx', cli, 'rpc-server', '--host', '0.0.0.0', '--port', '1'], { encoding: 'utf8', timeout: 60_000 });
    expect(refused.status).not.toBe(0);
    expect(refused.stderr).toMatch(/refusing to listen on 0\.0\.0\.0.*no authentication.*--allow-remote/s);

    const port = await freePort();
    const child = spawn(process.execPath, ['--import', 'tsx', cli, 'rpc-server', '--host', '0.0.0.0', '--port', String(port), '--allow-remote', '--threads', '1'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    try {
      const stderr = await new Promise<string>((resolve, reject) => {
        let text = '';
        child.stderr!.on('data', (d: Buffer) => {
          text += d.toString();
          if (text.includes('listening on')) resolve(text);
        });
        child.once('exit', (code) => reject(new Error(`exited ${code}: ${text}`)));
      });
      expect(stderr).toContain('WARNING');
      expect(stderr).toContain('no authentication');
    } finally {
      await stop(child);
    }
  });

  it('reports a port it cannot listen on as an error, not a hang', async () => {
    const blocker = createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    const { port } = blocker.address() as { port: number };
    try {
      const r = spawnSync(process.execPath, ['--import', 'tsx', cli, 'rpc-server', '--port', String(port), '--threads', '1'], { encoding: 'utf8', timeout: 60_000 });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain('RPC_SERVER');
    } finally {
      blocker.close();
    }
  });
});
