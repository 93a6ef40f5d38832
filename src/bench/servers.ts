/**
 * The two servers the latency workloads compare, each in its own process with the same model,
 * threads, batch, parallel sequences and per-sequence context: our `genesis serve` and llama.cpp's
 * `llama-server` built from the same source. The load generator (loadgen.ts) drives both.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';

import { ensureReferenceTool } from '../../scripts/llama.mjs';
import { splitArgs } from './reference.js';
import type { SplitSettings } from './types.js';

export interface ServerSettings {
  model: string;
  threads: number;
  batchSize: number;
  gpuLayers: number;
  split?: SplitSettings;
  /** Sequences decoded together (llama-server: slots). */
  parallel: number;
  /** Context per sequence. */
  contextPerSequence: number;
  /** Ours only: one shared KV pool of this many tokens (--kv-budget) instead of parallel × context. */
  kvBudget?: number;
  /** Ours only: paged attention over one shared KV pool (--kv-paged). */
  kvPaged?: boolean;
  /** Ours only: the paged pool's block size (--kv-block-size; with kvPaged). */
  kvBlockSize?: number;
  /** Ours only: host memory for preempted sequences' KV (--kv-swap; with a pool). */
  kvSwapMemory?: number;
  /** Ours only: group-limited MoE routing in one op (--fused-moe-routing). */
  fusedMoeRouting?: boolean;
  log?: (line: string) => void;
  /** Time allowed for loading the model and answering /health (default 300 s). */
  startTimeoutMs?: number;
}

export interface RunningServer {
  name: string;
  baseUrl: string;
  pid: number | undefined;
  stop(): Promise<void>;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** How to run our CLI: the compiled one next to this file, or the TypeScript source under tsx. */
function genesisCommand(): string[] {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.ts')) return [process.execPath, '--import', 'tsx', fileURLToPath(new URL('../cli/main.ts', import.meta.url))];
  return [process.execPath, fileURLToPath(new URL('../cli/main.js', import.meta.url))];
}

async function start(name: string, command: string[], port: number, s: ServerSettings): Promise<RunningServer> {
  const [bin, ...args] = command as [string, ...string[]];
  s.log?.(`starting ${name}: ${[bin.split('/').pop(), ...args].join(' ')}`);
  const child = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let output = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    output = (output + d).slice(-8000);
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const baseUrl = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + (s.startTimeoutMs ?? 300_000);
  try {
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`${name} exited during start-up (${child.signalCode ?? child.exitCode}):\n${output.trim().split('\n').slice(-15).join('\n')}`);
      }
      if (Date.now() > deadline) throw new Error(`${name} did not answer ${baseUrl}/health in time:\n${output.slice(-2000)}`);
      const ok = await fetch(`${baseUrl}/health`).then((r) => r.ok, () => false);
      if (ok) break;
      await new Promise((r) => setTimeout(r, 250));
    }
  } catch (error) {
    await stopChild(child, exited);
    throw error;
  }
  return { name, baseUrl, pid: child.pid, stop: () => stopChild(child, exited) };
}

async function stopChild(child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

export async function startGenesisServer(s: ServerSettings): Promise<RunningServer> {
  const port = await freePort();
  const args = [
    'serve', '--model', `bench=${s.model}`, '--host', '127.0.0.1', '--port', String(port),
    '--context-size', String(s.contextPerSequence), '--max-sequences', String(s.parallel),
    '--threads', String(s.threads), '--batch-size', String(s.batchSize), '--gpu-layers', String(s.gpuLayers),
    '--max-tokens-limit', String(s.contextPerSequence), '--drain-timeout', '1', ...splitArgs(s.split, 'genesis'),
    ...(s.kvBudget ? ['--kv-budget', String(s.kvBudget)] : []),
    ...(s.kvPaged ? ['--kv-paged'] : []),
    ...(s.kvPaged && (s.kvBlockSize ?? 1) > 1 ? ['--kv-block-size', String(s.kvBlockSize)] : []),
    ...(s.kvSwapMemory ? ['--kv-swap', String(s.kvSwapMemory)] : []),
    ...(s.fusedMoeRouting ? ['--fused-moe-routing'] : []),
  ];
  return start('genesis serve', [...genesisCommand(), ...args], port, s);
}

export async function startLlamaServer(s: ServerSettings & { tool?: string }): Promise<RunningServer> {
  const port = await freePort();
  const tool = s.tool ?? ensureReferenceTool('llama-server');
  const args = [
    '-m', s.model, '--host', '127.0.0.1', '--port', String(port), '--alias', 'bench',
    '-c', String(s.contextPerSequence * s.parallel), '-np', String(s.parallel), '-no-kvu',
    '-t', String(s.threads), '-tb', String(s.threads), '-b', String(s.batchSize), '-ub', String(s.batchSize),
    '-ngl', String(s.gpuLayers), '--no-webui', ...splitArgs(s.split, 'tool'),
  ];
  return start('llama-server', [tool, ...args], port, s);
}
