/**
 * Our side of the in-process workloads (single stream, batched), run in a fresh process per round
 * as llama-bench and llama-batched-bench are: on a shared VM a process can land in a slow spell
 * that lasts its whole life (seen here: the same command 20–30 % slower in one process than the
 * next), so measuring every round of ours in the one harness process would bias the ratio.
 *
 *   node worker.js --bench-worker '<json>'   prints one JSON line with the figures
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

import { loadModel, type Model } from '../model.js';
import { mulberry32 } from '../synthetic/models.js';
import type { SplitSettings } from './types.js';

export interface WorkerModel {
  path: string;
  threads: number;
  batchSize: number;
  gpuLayers: number;
  split?: SplitSettings;
  seed: number;
  /** loadModel's fusedMoeRouting (bench --fused-moe-routing). */
  fusedMoeRouting?: boolean;
}

export type WorkerJob =
  | ({ kind: 'single'; ppTokens: number[]; tgTokens: number } & WorkerModel)
  | ({ kind: 'batched'; concurrency: number[]; promptTokens: number; genTokens: number; expertStats?: boolean } & WorkerModel);

/** A batched job with expertStats: the figures, and the expert counts of its last concurrency level. */
export interface ExpertCounts {
  experts: Array<{ layer: number; counts: number[] }>;
}

/** single: tokens/s by 'pp<N>' and 'tg<N>'; batched: per B, generation and whole-run tokens/s. */
export type WorkerResult = Record<string, number> | (Record<string, { tg: number; total: number }> & Partial<ExpertCounts>);

export function randomPrompt(random: () => number, vocabSize: number, length: number): number[] {
  // Token 0 and the last ids are often special; stay within ordinary ids.
  return Array.from({ length }, () => 1 + Math.floor(random() * Math.max(1, vocabSize - 2)));
}

async function warm(model: Model, random: () => number, tokens: number): Promise<void> {
  // As llama-bench warms up with the test's own shape: the first decode of a shape builds its graph
  // and first touches its compute-buffer pages, which is not what the figure is about.
  await model.complete(randomPrompt(random, model.info.vocabSize, tokens), { maxTokens: 2, temperature: 0, ignoreEos: true });
}

async function single(job: Extract<WorkerJob, { kind: 'single' }>): Promise<Record<string, number>> {
  const contextSize = Math.max(...job.ppTokens, job.tgTokens + 1) + 1;
  const model = await loadModel(job.path, { contextSize, maxSequences: 1, batchSize: job.batchSize, threads: job.threads, gpuLayers: job.gpuLayers, ...job.split,
    ...(job.fusedMoeRouting ? { fusedMoeRouting: true } : {}) });
  const out: Record<string, number> = {};
  try {
    const random = mulberry32(job.seed);
    await warm(model, random, Math.max(...job.ppTokens));
    for (const n of job.ppTokens) {
      const r = await model.complete(randomPrompt(random, model.info.vocabSize, n), { maxTokens: 1, temperature: 0, ignoreEos: true });
      // promptMs: admitted to first token, the prompt's decode (plus sampling one token).
      out[`pp${n}`] = (n / r.timings.promptMs) * 1000;
    }
    // llama-bench tg: n decodes of one token from an empty context; ours: a 1-token prompt and n
    // tokens, which is also n decodes (the prompt's decode yields the first token).
    const r = await model.complete(randomPrompt(random, model.info.vocabSize, 1), { maxTokens: job.tgTokens, temperature: 0, ignoreEos: true });
    out[`tg${job.tgTokens}`] = (r.usage.completionTokens / (r.timings.promptMs + r.timings.generationMs)) * 1000;
  } finally {
    await model.dispose();
  }
  return out;
}

async function batched(job: Extract<WorkerJob, { kind: 'batched' }>): Promise<Record<string, { tg: number; total: number }> & Partial<ExpertCounts>> {
  const { promptTokens: pp, genTokens: tg } = job;
  const model = await loadModel(job.path, {
    contextSize: pp + tg + 1, maxSequences: Math.max(...job.concurrency), batchSize: job.batchSize, threads: job.threads, gpuLayers: job.gpuLayers, ...job.split,
    ...(job.expertStats ? { expertStats: true } : {}),
    ...(job.fusedMoeRouting ? { fusedMoeRouting: true } : {}),
  });
  const out: Record<string, { tg: number; total: number }> & Partial<ExpertCounts> = {};
  try {
    const random = mulberry32(job.seed);
    await warm(model, random, pp);
    for (const B of job.concurrency) {
      if (job.expertStats) await model.expertStats({ reset: true });
      const started = performance.now();
      const results = await Promise.all(
        Array.from({ length: B }, () => model.complete(randomPrompt(random, model.info.vocabSize, pp), { maxTokens: tg, temperature: 0, ignoreEos: true })),
      );
      const ended = performance.now();
      // As llama-batched-bench splits prompt and generation: generation runs from the moment every
      // sequence has its first token to the last token (B·(tg-1) tokens decoded).
      const firstAll = Math.max(...results.map((r) => r.timings.queuedMs + r.timings.promptMs));
      const lastAll = Math.max(...results.map((r) => r.timings.queuedMs + r.timings.promptMs + r.timings.generationMs));
      out[String(B)] = { tg: ((B * (tg - 1)) / (lastAll - firstAll)) * 1000, total: ((B * (pp + tg)) / (ended - started)) * 1000 };
      if (job.expertStats) out.experts = (await model.expertStats()).layers.map(({ layer, counts }) => ({ layer, counts }));
    }
  } finally {
    await model.dispose();
  }
  return out;
}

/** How to run this module: compiled, or the TypeScript source under tsx. */
function command(): string[] {
  const here = fileURLToPath(import.meta.url);
  return here.endsWith('.ts') ? [process.execPath, '--import', 'tsx', here] : [process.execPath, here];
}

/** Runs `job` in a fresh Node process and returns its figures. */
export function runInWorker(job: Extract<WorkerJob, { kind: 'single' }>): Promise<Record<string, number>>;
export function runInWorker(job: Extract<WorkerJob, { kind: 'batched' }>): Promise<Record<string, { tg: number; total: number }> & Partial<ExpertCounts>>;
export function runInWorker(job: WorkerJob): Promise<WorkerResult> {
  const [bin, ...args] = command() as [string, ...string[]];
  return new Promise((resolve, reject) => {
    const child = spawn(bin, [...args, '--bench-worker', JSON.stringify(job)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4000)));
    child.on('error', reject);
    child.on('close', (code) => {
      const line = stdout.trim().split('\n').at(-1) ?? '';
      if (code === 0 && line.startsWith('{')) return resolve(JSON.parse(line) as WorkerResult);
      reject(new Error(`benchmark worker (${job.kind}) exited with status ${code}: ${stderr.trim() || stdout.trim()}`));
    });
  });
}

if (process.argv[2] === '--bench-worker') {
  const job = JSON.parse(process.argv[3] ?? '{}') as WorkerJob;
  const result = job.kind === 'single' ? await single(job) : await batched(job);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}
