/**
 * llama.cpp's own benchmark tools as references: llama-bench (single stream pp/tg) and
 * llama-batched-bench (aggregate throughput at each concurrency), built by the harness from the
 * pinned source with the flags our addon was built with (scripts/llama.mjs), run on the same GGUF
 * with the same threads, batch and GPU layers.
 */
import { spawn } from 'node:child_process';

import { ensureReferenceTool } from '../../scripts/llama.mjs';
import type { SplitSettings } from './types.js';

/**
 * The split as command-line arguments: llama.cpp's tools ('tool': -sm -ts -mg --rpc, proportions
 * joined by '/', which llama-bench and the common parser both read) or `genesis serve` ('genesis').
 */
export function splitArgs(split: SplitSettings | undefined, style: 'tool' | 'genesis'): string[] {
  if (!split) return [];
  const tool = style === 'tool';
  const args: string[] = [];
  if (split.rpcServers?.length) args.push(tool ? '--rpc' : '--rpc', split.rpcServers.join(','));
  if (split.splitMode) args.push(tool ? '-sm' : '--split-mode', split.splitMode);
  if (split.tensorSplit?.length) args.push(tool ? '-ts' : '--tensor-split', split.tensorSplit.join(tool ? '/' : ','));
  if (split.mainGpu !== undefined) args.push(tool ? '-mg' : '--main-gpu', String(split.mainGpu));
  return args;
}

export interface ToolSettings {
  model: string;
  threads: number;
  batchSize: number;
  gpuLayers: number;
  split?: SplitSettings;
  /** The binary (default: built from the pinned source on first use). */
  tool?: string;
  log?: (line: string) => void;
}

/** Runs a tool to completion; rejects with its last output lines on a non-zero exit. */
export function runTool(tool: string, args: string[], log?: (line: string) => void): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', (error) => reject(new Error(`could not run ${tool}: ${error.message}`)));
    child.on('close', (code, signal) => {
      if (code === 0) return resolve({ stdout, stderr });
      const tail = (stderr + stdout).trim().split('\n').slice(-15).join('\n');
      reject(new Error(`${tool} ${args.join(' ')} exited with ${signal ?? `status ${code}`}:\n${tail}`));
    });
    log?.(`${tool.split('/').pop()} ${args.join(' ')}`);
  });
}

export interface LlamaBenchRow {
  nPrompt: number;
  nGen: number;
  /** tokens/s of each repetition. */
  samples: number[];
}

/** llama-bench -o json → one row per test. */
export function parseLlamaBenchJson(stdout: string): LlamaBenchRow[] {
  const start = stdout.indexOf('[');
  if (start < 0) throw new Error(`llama-bench printed no JSON: ${stdout.slice(0, 200)}`);
  const rows = JSON.parse(stdout.slice(start)) as Array<{ n_prompt: number; n_gen: number; samples_ts?: number[]; avg_ts: number }>;
  return rows.map((r) => ({ nPrompt: r.n_prompt, nGen: r.n_gen, samples: r.samples_ts ?? [r.avg_ts] }));
}

/** llama-bench for prompt processing at each of `pp` and generation of `tg` tokens. */
export async function llamaBench(s: ToolSettings & { pp: number[]; tg: number; repetitions: number }): Promise<LlamaBenchRow[]> {
  const tool = s.tool ?? ensureReferenceTool('llama-bench');
  const args = [
    '-m', s.model, '-t', String(s.threads), '-b', String(s.batchSize), '-ub', String(s.batchSize),
    '-ngl', String(s.gpuLayers), '-p', s.pp.join(','), '-n', String(s.tg), '-r', String(s.repetitions), '-o', 'json',
    ...splitArgs(s.split, 'tool'),
  ];
  return parseLlamaBenchJson((await runTool(tool, args, s.log)).stdout);
}

export interface BatchedBenchRow {
  pp: number;
  tg: number;
  pl: number;
  /** Aggregate generation tokens/s: pl·tg / t_tg. */
  speedTg: number;
  /** Whole run: pl·(pp+tg) / t. */
  speed: number;
}

/** llama-batched-bench --output-format jsonl → one row per (pp, tg, pl). */
export function parseBatchedBenchJsonl(stdout: string): BatchedBenchRow[] {
  const rows: BatchedBenchRow[] = [];
  for (const line of stdout.split('\n')) {
    // llama.cpp's logger shares stdout with the rows: take the object wherever it sits on the line.
    const start = line.indexOf('{"');
    const end = line.lastIndexOf('}');
    if (start < 0 || end < start) continue;
    let r: { pp?: unknown; tg?: unknown; pl?: unknown; speed_tg?: unknown; speed?: unknown };
    try {
      r = JSON.parse(line.slice(start, end + 1)) as typeof r;
    } catch {
      continue;
    }
    if (typeof r.pl !== 'number' || typeof r.speed_tg !== 'number' || typeof r.speed !== 'number') continue;
    rows.push({ pp: Number(r.pp), tg: Number(r.tg), pl: r.pl, speedTg: r.speed_tg, speed: r.speed });
  }
  return rows;
}

/**
 * llama-batched-bench at each concurrency in `npl`, one KV stream per sequence (-no-kvu, as our
 * engine runs by default), context `contextPerSequence` per sequence.
 */
export async function batchedBench(
  s: ToolSettings & { pp: number; tg: number; npl: number[]; contextPerSequence: number },
): Promise<BatchedBenchRow[]> {
  const tool = s.tool ?? ensureReferenceTool('llama-batched-bench');
  const maxB = Math.max(...s.npl);
  const run = (npl: number[]) =>
    runTool(
      tool,
      [
        '-m', s.model, '-c', String(s.contextPerSequence * maxB), '-b', String(s.batchSize), '-ub', String(s.batchSize),
        '-t', String(s.threads), '-tb', String(s.threads), '-ngl', String(s.gpuLayers), '-no-kvu',
        '-npp', String(s.pp), '-ntg', String(s.tg), '-npl', npl.join(','), '--output-format', 'jsonl',
        ...splitArgs(s.split, 'tool'),
      ],
      s.log,
    );
  let { stdout, stderr } = await run(s.npl);
  const rows = parseBatchedBenchJsonl(stdout);
  let missing = s.npl.filter((B) => !rows.some((r) => r.pl === B));
  if (missing.length > 0) {
    // Its rows go through llama.cpp's asynchronous logger, which can lose the last ones when the
    // process ends (seen once in CI: exit status 0, B=2 missing). Ask once more for those.
    s.log?.(`llama-batched-bench printed no result for B=${missing.join(',')}: running those again`);
    ({ stdout, stderr } = await run(missing));
    rows.push(...parseBatchedBenchJsonl(stdout).filter((r) => missing.includes(r.pl)));
    missing = s.npl.filter((B) => !rows.some((r) => r.pl === B));
  }
  if (missing.length > 0) {
    throw new Error(`llama-batched-bench printed no result for B=${missing.join(',')}:\n${(stdout + stderr).trim().split('\n').slice(-10).join('\n')}`);
  }
  return rows.sort((a, b) => s.npl.indexOf(a.pl) - s.npl.indexOf(b.pl));
}
