/**
 * The benchmark harness: every workload on every model, each figure measured next to llama.cpp's
 * own tool for it in the same run, on the same GGUF with the same threads, batch and GPU layers.
 *
 *   single stream   ours (the Model API, in a fresh process per round) vs llama-bench pp/tg
 *   batched         ours (B concurrent requests, fresh process per round) vs llama-batched-bench
 *   server          `genesis serve` vs `llama-server`, same load generator, per concurrency
 *   shared-prefix   many requests with one long common prefix, both servers
 *   mixed           Poisson arrivals with random prompt/output lengths, both servers
 *   roofline        weight bytes per decode step / bandwidth measured in this run
 *   kv-pool         sequences held in one KV budget: llama-server's per-sequence slots vs our shared
 *                   pool (--kv-budget), same short requests, same client concurrency
 *   experts         MoE models: batched decode with expert statistics on vs off (our own
 *                   reference), and the per-layer expert load as a heatmap
 *
 * Rounds interleave ours and the reference and keep each side's best figure: on a shared machine
 * the best run is the least disturbed one, and interleaving spreads slow spells over both sides.
 * Every round starts fresh processes on both sides (worker.ts says why).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, hostname, totalmem, type, release } from 'node:os';
import { join } from 'node:path';

import { LLAMA_COMMIT, repoRoot } from '../../scripts/llama.mjs';
import { readGguf } from '../gguf/index.js';
import { mulberry32 } from '../synthetic/models.js';
import { randomPrompt, runInWorker } from './worker.js';
import { measureBandwidth, systemInfo } from '../system.js';
import { poissonArrivals, runLoad, type LoadRequest } from './loadgen.js';
import { describeModel, ensureBenchModel, specLabel, type BenchModelSpec } from './models.js';
import { batchedBench, llamaBench } from './reference.js';
import { renderHtml, renderMarkdown, formatRatioTable } from './report.js';
import { roofline } from './roofline.js';
import { startGenesisServer, startLlamaServer, type RunningServer } from './servers.js';
import type {
  BatchedRow, BenchModelRun, BenchReport, BenchSettings, ExpertsResult, KvPoolResult, RoutingResult, LatencyRow, PrefixCacheTtft, LoadStats, MixedResult, RatioRow, SharedPrefixResult, SingleStreamRow, SplitSettings,
} from './types.js';

export type Workload = 'single' | 'batched' | 'server' | 'shared-prefix' | 'mixed' | 'kv-pool' | 'experts' | 'routing';
export const WORKLOADS: readonly Workload[] = ['single', 'batched', 'server', 'shared-prefix', 'mixed', 'kv-pool', 'experts', 'routing'];

export interface BenchOptions {
  /** Preset specs (generated on first use) or paths of GGUF files. */
  models: Array<BenchModelSpec | string>;
  quick: boolean;
  threads: number;
  batchSize: number;
  gpuLayers: number;
  /** Several devices or RPC servers: passed to ours and to every reference alike. */
  split: SplitSettings;
  repeat: number;
  workloads: ReadonlySet<Workload>;
  /** Single stream: prompt lengths for pp, tokens for tg. */
  ppTokens: number[];
  tgTokens: number;
  /** Concurrency levels of the batched sweep and the server latency sweep. */
  concurrency: number[];
  batched: { promptTokens: number; genTokens: number };
  latency: { promptTokens: number; genTokens: number; requestsPerSlot: number };
  sharedPrefix: { requests: number; concurrency: number; prefixTokens: number; suffixTokens: number; genTokens: number };
  mixed: { requests: number; arrivalRate: number; promptTokens: [number, number]; genTokens: [number, number]; seed: number };
  /** kv-pool: the KV budget, the longest context a request may have, and the short requests sent. */
  kvPool: { budgetTokens: number; maxContext: number; requests: number; concurrency: number; promptTokens: number; genTokens: number };
  /** Ours with paged attention over one shared KV pool (--kv-paged) in every server workload. */
  kvPaged: boolean;
  /** With kvPaged: the pool's block size (--kv-block-size; 1: cell by cell). */
  kvBlockSize: number;
  /** Ours copies preempted sequences' KV to this much host memory (--kv-swap; 0: recomputed). */
  kvSwapMemory: number;
  /** Ours with fusedMoeRouting (models with expert groups route through one op). */
  fusedMoeRouting: boolean;
  /** Measure memory bandwidth and compute the roofline (default true). */
  roofline: boolean;
  /** Directory for report.json, report.md and report.html. */
  outDir: string;
  /** Where generated models are cached (default: the synthetic model cache). */
  modelCacheDir?: string;
  log: (line: string) => void;
}

export function defaultBenchOptions(quick: boolean): Omit<BenchOptions, 'outDir' | 'log'> {
  const threads = availableParallelism();
  if (quick) {
    return {
      models: [{ preset: 'qwen3-30b-a3b', type: 'q4_0', layers: 1 }, { preset: 'llama-3-8b', type: 'q4_0', layers: 1 }],
      quick,
      threads,
      batchSize: 512,
      gpuLayers: 0,
      split: {},
      repeat: 2,
      workloads: new Set(WORKLOADS),
      ppTokens: [64, 256],
      tgTokens: 32,
      concurrency: [1, 2, 4, 8],
      batched: { promptTokens: 32, genTokens: 16 },
      latency: { promptTokens: 64, genTokens: 16, requestsPerSlot: 2 },
      sharedPrefix: { requests: 8, concurrency: 4, prefixTokens: 256, suffixTokens: 16, genTokens: 8 },
      mixed: { requests: 12, arrivalRate: 2, promptTokens: [16, 128], genTokens: [4, 24], seed: 7 },
      kvPool: { budgetTokens: 2048, maxContext: 1024, requests: 32, concurrency: 16, promptTokens: 32, genTokens: 16 },
      kvPaged: false,
      kvBlockSize: 1,
      kvSwapMemory: 0,
      fusedMoeRouting: false,
      roofline: true,
    };
  }
  return {
    models: (['qwen3-30b-a3b', 'llama-3-8b'] as const).flatMap((preset) =>
      (['q4_0', 'q8_0', 'f16'] as const).map((type) => ({ preset, type, layers: 2 })),
    ),
    quick,
    threads,
    batchSize: 512,
    gpuLayers: 0,
    split: {},
    repeat: 3,
    workloads: new Set(WORKLOADS),
    ppTokens: [128, 512, 2048],
    tgTokens: 128,
    concurrency: [1, 2, 4, 8, 16, 32, 64],
    batched: { promptTokens: 128, genTokens: 64 },
    latency: { promptTokens: 256, genTokens: 64, requestsPerSlot: 3 },
    sharedPrefix: { requests: 64, concurrency: 16, prefixTokens: 2048, suffixTokens: 64, genTokens: 32 },
    mixed: { requests: 64, arrivalRate: 4, promptTokens: [32, 1024], genTokens: [16, 256], seed: 7 },
    kvPool: { budgetTokens: 8192, maxContext: 4096, requests: 128, concurrency: 64, promptTokens: 64, genTokens: 64 },
    kvPaged: false,
    kvBlockSize: 1,
    kvSwapMemory: 0,
    fusedMoeRouting: false,
    roofline: true,
  };
}

/** Step counter for progress lines: "[bench 3/14, 1m20s] ...". */
class Progress {
  #done = 0;
  readonly #started = performance.now();
  constructor(
    readonly total: number,
    readonly log: (line: string) => void,
  ) {}
  step(what: string): void {
    this.#done++;
    this.log(`[${this.#done}/${this.total} ${this.elapsed()}] ${what}`);
  }
  elapsed(): string {
    const s = Math.round((performance.now() - this.#started) / 1000);
    return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  }
}

const best = (a: number | undefined, b: number): number => Math.max(a ?? 0, b);

async function singleStream(o: BenchOptions, path: string, progress: Progress): Promise<SingleStreamRow[]> {
  const reference = new Map<string, number>();
  const ours = new Map<string, number>();
  const model = { path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, fusedMoeRouting: o.fusedMoeRouting };
  for (let round = 0; round < o.repeat; round++) {
    progress.step(`single stream, round ${round + 1}/${o.repeat}: llama-bench pp ${o.ppTokens.join(',')} tg ${o.tgTokens}`);
    for (const r of await llamaBench({ model: path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, pp: o.ppTokens, tg: o.tgTokens, repetitions: 1, log: o.log })) {
      const k = r.nGen > 0 ? `tg${r.nGen}` : `pp${r.nPrompt}`;
      reference.set(k, best(reference.get(k), Math.max(...r.samples)));
    }
    progress.step(`single stream, round ${round + 1}/${o.repeat}: genesis pp ${o.ppTokens.join(',')} tg ${o.tgTokens}`);
    const figures = await runInWorker({ kind: 'single', ...model, ppTokens: o.ppTokens, tgTokens: o.tgTokens, seed: round + 1 });
    for (const [k, v] of Object.entries(figures)) ours.set(k, best(ours.get(k), v));
  }
  return [
    ...o.ppTokens.map((n) => ({ test: 'pp' as const, tokens: n, ours: ours.get(`pp${n}`) ?? 0, reference: reference.get(`pp${n}`) ?? 0 })),
    { test: 'tg' as const, tokens: o.tgTokens, ours: ours.get(`tg${o.tgTokens}`) ?? 0, reference: reference.get(`tg${o.tgTokens}`) ?? 0 },
  ];
}

async function batched(o: BenchOptions, path: string, progress: Progress): Promise<BatchedRow[]> {
  const { promptTokens: pp, genTokens: tg } = o.batched;
  const npl = o.concurrency;
  const ref = new Map<number, { tg: number; total: number }>();
  const ours = new Map<number, { tg: number; total: number }>();
  const keep = (into: typeof ref, B: number, v: { tg: number; total: number }) => {
    const old = into.get(B);
    into.set(B, { tg: best(old?.tg, v.tg), total: best(old?.total, v.total) });
  };
  for (let round = 0; round < o.repeat; round++) {
    progress.step(`batched, round ${round + 1}/${o.repeat}: llama-batched-bench B=${npl.join(',')}`);
    const rows = await batchedBench({ model: path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, pp, tg, npl, contextPerSequence: pp + tg + 1, log: o.log });
    for (const r of rows) keep(ref, r.pl, { tg: r.speedTg, total: r.speed });
    progress.step(`batched, round ${round + 1}/${o.repeat}: genesis B=${npl.join(',')}`);
    const figures = await runInWorker({
      kind: 'batched', path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, concurrency: npl, promptTokens: pp, genTokens: tg, seed: 100 + round,
      fusedMoeRouting: o.fusedMoeRouting,
    });
    for (const B of npl) keep(ours, B, figures[String(B)]!);
  }
  return npl.map((B) => ({
    concurrency: B,
    promptTokens: pp,
    genTokens: tg,
    ours: ours.get(B)?.tg ?? 0,
    reference: ref.get(B)?.tg ?? 0,
    oursTotal: ours.get(B)?.total ?? 0,
    referenceTotal: ref.get(B)?.total ?? 0,
  }));
}

interface ServerWorkloads {
  latency: Array<{ concurrency: number; stats: LoadStats }>;
  sharedPrefix?: LoadStats;
  prefixCache?: PrefixCacheTtft;
  mixed?: LoadStats;
}

/** Every server workload against one running server, with prompts identical for both servers. */
async function serverWorkloads(o: BenchOptions, server: RunningServer, vocabSize: number, progress: Progress, tag: string): Promise<ServerWorkloads> {
  const out: ServerWorkloads = { latency: [] };
  const run = (requests: LoadRequest[], concurrency?: number) =>
    runLoad({ baseUrl: server.baseUrl, model: 'bench', requests, ...(concurrency ? { concurrency } : {}), timeoutMs: 600_000 });
  // Warm-up request (compute buffers, first-use paths).
  await run([{ prompt: randomPrompt(mulberry32(1), vocabSize, 8), maxTokens: 2 }], 1);
  if (o.workloads.has('server')) {
    const { promptTokens, genTokens, requestsPerSlot } = o.latency;
    for (const c of o.concurrency) {
      progress.step(`${server.name}, ${tag}: latency at concurrency ${c} (${c * requestsPerSlot} requests, prompt ${promptTokens}, output ${genTokens})`);
      const random = mulberry32(1000 + c);
      const requests = Array.from({ length: c * requestsPerSlot }, () => ({ prompt: randomPrompt(random, vocabSize, promptTokens), maxTokens: genTokens }));
      out.latency.push({ concurrency: c, stats: await run(requests, c) });
    }
  }
  if (o.workloads.has('shared-prefix')) {
    const s = o.sharedPrefix;
    progress.step(`${server.name}, ${tag}: shared prefix (${s.requests} requests, ${s.prefixTokens}-token common prefix, concurrency ${s.concurrency})`);
    const random = mulberry32(2000);
    const prefix = randomPrompt(random, vocabSize, s.prefixTokens);
    const requests = Array.from({ length: s.requests }, () => ({ prompt: [...prefix, ...randomPrompt(random, vocabSize, s.suffixTokens)], maxTokens: s.genTokens }));
    out.sharedPrefix = await run(requests, s.concurrency);
    // Then a prefix nothing holds yet: one request alone (cold), and one more with the same prefix
    // and another suffix (cached).
    const fresh = randomPrompt(random, vocabSize, s.prefixTokens);
    const alone = async () => (await run([{ prompt: [...fresh, ...randomPrompt(random, vocabSize, s.suffixTokens)], maxTokens: 1 }], 1)).ttftMs.p50;
    const coldMs = await alone();
    out.prefixCache = { coldMs, cachedMs: await alone() };
  }
  if (o.workloads.has('mixed')) {
    const m = o.mixed;
    progress.step(`${server.name}, ${tag}: mixed (${m.requests} Poisson arrivals at ${m.arrivalRate}/s)`);
    const random = mulberry32(m.seed);
    const at = poissonArrivals(m.requests, m.arrivalRate, random);
    const between = ([lo, hi]: [number, number]) => lo + Math.floor(random() * (hi - lo + 1));
    const requests = at.map((t) => ({ at: t, prompt: randomPrompt(random, vocabSize, between(m.promptTokens)), maxTokens: between(m.genTokens) }));
    out.mixed = await run(requests);
  }
  return out;
}

/** Of two rounds' figures, the one with fewer errors, then the higher output throughput. */
function bestLoad<T extends LoadStats | undefined>(x: LoadStats | undefined, y: T): LoadStats | T {
  return !x || !y ? (x ?? y) : y.errors < x.errors || (y.errors === x.errors && y.outputTokensPerSecond > x.outputTokensPerSecond) ? y : x;
}

/** Per workload, the round with the higher output throughput (fewer errors first), stats kept whole. */
function bestServerRun(a: ServerWorkloads | undefined, b: ServerWorkloads): ServerWorkloads {
  if (!a) return b;
  const out: ServerWorkloads = { latency: a.latency.map((l, i) => ({ concurrency: l.concurrency, stats: bestLoad(l.stats, b.latency[i]?.stats)! })) };
  const sharedPrefix = bestLoad(a.sharedPrefix, b.sharedPrefix);
  const prefixCache = !a.prefixCache || (b.prefixCache && b.prefixCache.cachedMs < a.prefixCache.cachedMs) ? b.prefixCache : a.prefixCache;
  if (prefixCache) out.prefixCache = prefixCache;
  const mixed = bestLoad(a.mixed, b.mixed);
  if (sharedPrefix) out.sharedPrefix = sharedPrefix;
  if (mixed) out.mixed = mixed;
  return out;
}

/**
 * Expert statistics on against off: the batched workload at the sweep's largest concurrency, in
 * fresh processes, interleaved (the order alternates between rounds, so that neither side is always
 * second), best of each; the counted run's expert load for the heatmap.
 */
async function expertLoad(o: BenchOptions, path: string, progress: Progress): Promise<ExpertsResult> {
  const { promptTokens: pp, genTokens: tg } = o.batched;
  const B = Math.max(...o.concurrency);
  let statsOn = 0;
  let statsOff = 0;
  let layers: ExpertsResult['layers'] = [];
  for (let round = 0; round < o.repeat; round++) {
    for (const on of round % 2 === 0 ? [false, true] : [true, false]) {
      progress.step(`experts, round ${round + 1}/${o.repeat}: genesis B=${B}, expert statistics ${on ? 'on' : 'off'}`);
      const figures = await runInWorker({
        kind: 'batched', path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, concurrency: [B], promptTokens: pp, genTokens: tg,
        seed: 300 + round, expertStats: on, fusedMoeRouting: o.fusedMoeRouting,
      });
      const tps = figures[String(B)]!.tg;
      if (on) {
        statsOn = best(statsOn, tps);
        layers = figures.experts ?? layers;
      } else {
        statsOff = best(statsOff, tps);
      }
    }
  }
  return { concurrency: B, promptTokens: pp, genTokens: tg, statsOn, statsOff, layers };
}

/**
 * fusedMoeRouting on against off: the batched workload's sweep, each side in fresh processes,
 * interleaved with the order alternating between rounds, best of each. What decides whether the
 * one-op group-limited routing pays end to end, on top of its microbenchmark (gpu.sh moe).
 */
async function routingAb(o: BenchOptions, path: string, progress: Progress): Promise<RoutingResult> {
  const { promptTokens: pp, genTokens: tg } = o.batched;
  const on = new Map<number, number>();
  const off = new Map<number, number>();
  for (let round = 0; round < o.repeat; round++) {
    for (const fused of round % 2 === 0 ? [false, true] : [true, false]) {
      progress.step(`routing, round ${round + 1}/${o.repeat}: genesis B=${o.concurrency.join(',')}, fused MoE routing ${fused ? 'on' : 'off'}`);
      const figures = await runInWorker({
        kind: 'batched', path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, concurrency: o.concurrency, promptTokens: pp, genTokens: tg,
        seed: 400 + round, fusedMoeRouting: fused,
      });
      const into = fused ? on : off;
      for (const B of o.concurrency) into.set(B, best(into.get(B), figures[String(B)]!.tg));
    }
  }
  return { promptTokens: pp, genTokens: tg, rows: o.concurrency.map((B) => ({ concurrency: B, fusedOn: on.get(B) ?? 0, fusedOff: off.get(B) ?? 0 })) };
}

/** The most sequences the server reports active (genesis_active_sequences), polled until stopped. */
function watchActive(baseUrl: string): { stop: () => Promise<number> } {
  let peak = 0;
  let running = true;
  const poll = (async () => {
    while (running) {
      const text = await fetch(`${baseUrl}/metrics`).then((r) => r.text(), () => '');
      peak = Math.max(peak, metricValue(text, 'genesis_active_sequences') ?? 0);
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  return {
    stop: async () => {
      running = false;
      await poll;
      return peak;
    },
  };
}

/** The value of the bench model's sample of a Prometheus metric, if the text has one. */
function metricValue(text: string, name: string): number | undefined {
  const m = new RegExp(`^${name}\\{model="bench"\\} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : undefined;
}

/**
 * The same fixed KV budget both ways: llama-server with one slot per maxContext (its per-sequence
 * mode, -np budget/maxContext) and ours with one pool (--kv-budget) and a slot per client request.
 */
async function kvPool(o: BenchOptions, path: string, vocabSize: number, progress: Progress): Promise<KvPoolResult> {
  const k = o.kvPool;
  const slots = Math.max(1, Math.floor(k.budgetTokens / k.maxContext));
  const common = { model: path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, log: o.log };
  const random = mulberry32(4000);
  const requests = Array.from({ length: k.requests }, () => ({ prompt: randomPrompt(random, vocabSize, k.promptTokens), maxTokens: k.genTokens }));
  const load = (server: RunningServer) =>
    runLoad({ baseUrl: server.baseUrl, model: 'bench', requests: [{ prompt: requests[0]!.prompt.slice(0, 8), maxTokens: 2 }], concurrency: 1 }).then(() =>
      runLoad({ baseUrl: server.baseUrl, model: 'bench', requests, concurrency: k.concurrency, timeoutMs: 600_000 }));
  let reference: LoadStats | undefined;
  let ours: LoadStats | undefined;
  let oursSequences = 0;
  let oursPreemptions: number | undefined;
  let oursSwapIns: number | undefined;
  for (let round = 0; round < o.repeat; round++) {
    progress.step(`kv-pool, round ${round + 1}/${o.repeat}: llama-server, ${slots} slots of ${k.maxContext} in ${k.budgetTokens} tokens`);
    reference = bestLoad(reference, await withServer(() => startLlamaServer({ ...common, parallel: slots, contextPerSequence: k.maxContext }), load));
    progress.step(`kv-pool, round ${round + 1}/${o.repeat}: genesis serve, one pool of ${k.budgetTokens} tokens, ${k.concurrency} sequences`);
    const [stats, peak, preempted, swappedIn] = await withServer(
      () => startGenesisServer({ ...common, parallel: k.concurrency, contextPerSequence: k.maxContext, kvBudget: k.budgetTokens, kvPaged: o.kvPaged, kvBlockSize: o.kvBlockSize, kvSwapMemory: o.kvSwapMemory }),
      async (server) => {
        const watch = watchActive(server.baseUrl);
        const s = await load(server);
        const metrics = await fetch(`${server.baseUrl}/metrics`).then((r) => r.text(), () => '');
        return [s, await watch.stop(), metricValue(metrics, 'genesis_preemptions_total'), metricValue(metrics, 'genesis_kv_swap_ins_total')] as const;
      },
    );
    // The counts of the round kept.
    if (bestLoad(ours, stats) === stats) {
      oursPreemptions = preempted;
      oursSwapIns = swappedIn;
    }
    ours = bestLoad(ours, stats);
    oursSequences = Math.max(oursSequences, peak);
  }
  if (!reference || !ours) throw new RangeError('repeat must be at least 1');
  return {
    ...k,
    referenceSequences: slots,
    oursSequences,
    ...(oursPreemptions !== undefined ? { oursPreemptions } : {}),
    ...(oursSwapIns !== undefined ? { oursSwapIns } : {}),
    ours,
    reference,
  };
}

function serverContext(o: BenchOptions): { parallel: number; contextPerSequence: number } {
  const need = [o.latency.promptTokens + o.latency.genTokens];
  if (o.workloads.has('shared-prefix')) need.push(o.sharedPrefix.prefixTokens + o.sharedPrefix.suffixTokens + o.sharedPrefix.genTokens);
  if (o.workloads.has('mixed')) need.push(o.mixed.promptTokens[1] + o.mixed.genTokens[1]);
  const parallel = Math.max(...(o.workloads.has('server') ? o.concurrency : [1]), o.workloads.has('shared-prefix') ? o.sharedPrefix.concurrency : 1,
    o.workloads.has('mixed') ? Math.min(o.mixed.requests, 16) : 1);
  // Round up to a multiple of 256 (llama.cpp pads per-sequence context to 256 anyway).
  return { parallel, contextPerSequence: Math.ceil((Math.max(...need) + 8) / 256) * 256 };
}

async function withServer<T>(start: () => Promise<RunningServer>, body: (s: RunningServer) => Promise<T>): Promise<T> {
  const server = await start();
  try {
    return await body(server);
  } finally {
    await server.stop();
  }
}

function ratioRows(runs: BenchModelRun[]): RatioRow[] {
  const rows: RatioRow[] = [];
  const add = (r: Omit<RatioRow, 'ratio'>, lowerIsBetter = false, load?: { ours: LoadStats; reference: LoadStats }) => {
    if (!(r.ours > 0) || !(r.reference > 0)) return;
    const failed = load && load.ours.errors + load.reference.errors > 0 ? { ours: load.ours.errors, reference: load.reference.errors } : undefined;
    rows.push({ ...r, ratio: lowerIsBetter ? r.reference / r.ours : r.ours / r.reference, ...(failed ? { failed } : {}) });
  };
  for (const run of runs) {
    const model = run.name;
    for (const s of run.single) {
      add({ model, workload: s.test, label: `${s.test}${s.tokens}`, metric: 'tokens/s', unit: 't/s', ours: s.ours, reference: s.reference, referenceTool: 'llama-bench', target: 0.97 });
    }
    for (const b of run.batched) {
      add({
        model, workload: 'batched', label: `B=${b.concurrency}`, metric: 'aggregate decode', unit: 't/s', ours: b.ours, reference: b.reference,
        referenceTool: 'llama-batched-bench', ...(b.concurrency === 8 || b.concurrency === 32 ? { target: 1.0 } : {}),
      });
    }
    for (const l of run.latency) {
      add({ model, workload: 'server', label: `c=${l.concurrency}`, metric: 'output throughput', unit: 't/s', ours: l.ours.outputTokensPerSecond, reference: l.reference.outputTokensPerSecond, referenceTool: 'llama-server', target: 1.0 }, false, l);
      add({ model, workload: 'server', label: `c=${l.concurrency}`, metric: 'TTFT p50 (lower is better)', unit: 'ms', ours: l.ours.ttftMs.p50, reference: l.reference.ttftMs.p50, referenceTool: 'llama-server' }, true, l);
    }
    if (run.kvPool) {
      const k = run.kvPool;
      const label = `budget ${k.budgetTokens}, ctx ${k.maxContext}`;
      add({ model, workload: 'kv-pool', label, metric: 'sequences held at once', unit: 'seqs', ours: k.oursSequences, reference: k.referenceSequences, referenceTool: 'llama-server', target: 8 }, false, k);
      add({ model, workload: 'kv-pool', label, metric: 'output throughput', unit: 't/s', ours: k.ours.outputTokensPerSecond, reference: k.reference.outputTokensPerSecond, referenceTool: 'llama-server' }, false, k);
    }
    if (run.experts) {
      const e = run.experts;
      add({
        model, workload: 'experts', label: `B=${e.concurrency}`, metric: 'decode, expert statistics on', unit: 't/s', ours: e.statsOn, reference: e.statsOff,
        referenceTool: 'genesis, statistics off', target: 0.99,
      });
    }
    for (const r of run.routing?.rows ?? []) {
      add({ model, workload: 'routing', label: `B=${r.concurrency}`, metric: 'decode, fused MoE routing on', unit: 't/s', ours: r.fusedOn, reference: r.fusedOff, referenceTool: 'genesis, fused routing off' });
    }
    for (const [workload, r] of [['shared-prefix', run.sharedPrefix], ['mixed', run.mixed]] as const) {
      if (!r) continue;
      add({ model, workload, label: workload, metric: 'output throughput', unit: 't/s', ours: r.ours.outputTokensPerSecond, reference: r.reference.outputTokensPerSecond, referenceTool: 'llama-server' }, false, r);
      add({ model, workload, label: workload, metric: 'TTFT p50 (lower is better)', unit: 'ms', ours: r.ours.ttftMs.p50, reference: r.reference.ttftMs.p50, referenceTool: 'llama-server' }, true, r);
      const pc = workload === 'shared-prefix' ? run.sharedPrefix?.prefixCache : undefined;
      if (pc) {
        add({ model, workload, label: 'prefix cached', metric: 'TTFT, prefix cached (lower is better)', unit: 'ms', ours: pc.ours.cachedMs, reference: pc.reference.cachedMs, referenceTool: 'llama-server' }, true);
      }
    }
  }
  return rows;
}

function gitCommit(): string | null {
  try {
    const head = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: repoRoot, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: repoRoot, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    return dirty ? `${head}+dirty` : head;
  } catch {
    return null;
  }
}

function stepsPerModel(o: BenchOptions): number {
  let n = 1; // model preparation
  if (o.workloads.has('single')) n += 2 * o.repeat;
  if (o.workloads.has('batched')) n += 2 * o.repeat;
  if (o.workloads.has('experts')) n += 2 * o.repeat; // dense models skip them in one step each
  if (o.workloads.has('routing')) n += 2 * o.repeat; // models without expert groups, likewise
  if (o.workloads.has('kv-pool')) n += 2 * o.repeat;
  const serverSteps = (o.workloads.has('server') ? o.concurrency.length : 0) + (o.workloads.has('shared-prefix') ? 1 : 0) + (o.workloads.has('mixed') ? 1 : 0);
  return n + 2 * o.repeat * serverSteps;
}

export interface BenchOutcome {
  report: BenchReport;
  files: { json: string; markdown: string; html: string };
}

export async function runBench(o: BenchOptions): Promise<BenchOutcome> {
  const started = performance.now();
  const info = systemInfo();
  const onGpu = info.variant === 'cuda' && o.gpuLayers !== 0;
  const progress = new Progress(o.models.length * stepsPerModel(o) + (o.roofline ? 1 : 0), o.log);

  let bandwidth: number | undefined;
  let deviceName = `${cpus()[0]?.model.trim() ?? 'CPU'} ×${availableParallelism()}`;
  if (o.roofline) {
    progress.step(`measuring ${onGpu ? 'GPU' : 'CPU'} memory bandwidth`);
    const bw = await measureBandwidth(
      onGpu ? { device: 'gpu', bytes: 1024 ** 3, iterations: 20 } : { device: 'cpu', bytes: 256 * 1024 ** 2, iterations: 10, threads: o.threads },
    );
    bandwidth = bw.bestBytesPerSecond;
    if (onGpu) deviceName = bw.description || bw.device;
    o.log(`bandwidth: ${(bandwidth / 1e9).toFixed(1)} GB/s (${bw.device}, copy of ${bw.bytes / 1024 ** 2} MiB)`);
  }

  const runs: BenchModelRun[] = [];
  for (const m of o.models) {
    const label = typeof m === 'string' ? m : specLabel(m);
    progress.step(`${label}: preparing the model${typeof m === 'string' ? '' : ' (generated once, then cached)'}`);
    const path = typeof m === 'string' ? m : await ensureBenchModel(m, o.modelCacheDir);
    const shape = await describeModel(path, typeof m === 'string' ? 'file' : m.preset);
    o.log(`${label}: ${path} (${(shape.fileBytes / 1024 ** 3).toFixed(2)} GiB, ${(shape.params / 1e9).toFixed(2)} B parameters)`);
    const run: BenchModelRun = { name: label, path, shape, single: [], batched: [], latency: [] };
    if (o.workloads.has('single')) run.single = await singleStream(o, path, progress);
    if (o.workloads.has('batched')) run.batched = await batched(o, path, progress);
    if (o.workloads.has('experts')) {
      if ((shape.nExpert ?? 0) > 0) {
        run.experts = await expertLoad(o, path, progress);
      } else {
        for (let i = 0; i < 2 * o.repeat; i++) progress.step(`experts: skipped (${label} has no routed experts)`);
      }
    }
    if (o.workloads.has('routing')) {
      if (shape.expertGroups) {
        run.routing = await routingAb(o, path, progress);
      } else {
        for (let i = 0; i < 2 * o.repeat; i++) progress.step(`routing: skipped (${label} has no expert groups)`);
      }
    }
    const serving = ['server', 'shared-prefix', 'mixed'].some((w) => o.workloads.has(w as Workload));
    if (serving) {
      const settings = { model: path, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, ...serverContext(o), log: o.log };
      let reference: ServerWorkloads | undefined;
      let ours: ServerWorkloads | undefined;
      for (let round = 0; round < o.repeat; round++) {
        const tag = `round ${round + 1}/${o.repeat}`;
        reference = bestServerRun(reference, await withServer(() => startLlamaServer(settings), (s) => serverWorkloads(o, s, shape.vocabSize, progress, tag)));
        ours = bestServerRun(ours, await withServer(() => startGenesisServer({ ...settings, kvPaged: o.kvPaged, kvBlockSize: o.kvBlockSize, kvSwapMemory: o.kvPaged ? o.kvSwapMemory : 0, fusedMoeRouting: o.fusedMoeRouting }), (s) => serverWorkloads(o, s, shape.vocabSize, progress, tag)));
      }
      if (!reference || !ours) throw new RangeError('repeat must be at least 1');
      run.latency = ours.latency.map((l, i): LatencyRow => ({
        concurrency: l.concurrency, promptTokens: o.latency.promptTokens, genTokens: o.latency.genTokens, ours: l.stats, reference: reference.latency[i]!.stats,
      }));
      if (ours.sharedPrefix && reference.sharedPrefix) {
        const s = o.sharedPrefix;
        run.sharedPrefix = {
          ...s,
          ours: ours.sharedPrefix,
          reference: reference.sharedPrefix,
          ...(ours.prefixCache && reference.prefixCache ? { prefixCache: { ours: ours.prefixCache, reference: reference.prefixCache } } : {}),
        } satisfies SharedPrefixResult;
      }
      if (ours.mixed && reference.mixed) {
        const { requests, arrivalRate, promptTokens, genTokens, seed } = o.mixed;
        run.mixed = { requests, arrivalRate, promptTokens, genTokens, seed, ours: ours.mixed, reference: reference.mixed } satisfies MixedResult;
      }
    }
    if (o.workloads.has('kv-pool')) run.kvPool = await kvPool(o, path, shape.vocabSize, progress);
    if (bandwidth && run.batched.length > 0) {
      run.roofline = roofline(await readGguf(path), bandwidth, run.batched.map((b) => ({ concurrency: b.concurrency, tokensPerSecond: b.ours })));
    }
    runs.push(run);
  }

  const settings: BenchSettings = {
    quick: o.quick, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: o.split, repeat: o.repeat, concurrency: o.concurrency, ppTokens: o.ppTokens, tgTokens: o.tgTokens,
    ...(o.kvPaged ? { kvPaged: true } : {}),
    ...(o.kvPaged && o.kvBlockSize > 1 ? { kvBlockSize: o.kvBlockSize } : {}),
    ...(o.kvSwapMemory > 0 ? { kvSwapMemory: o.kvSwapMemory } : {}),
    ...(o.fusedMoeRouting ? { fusedMoeRouting: true } : {}),
  };
  const report: BenchReport = {
    ...reportHeader({ started, settings, device: { variant: info.variant, name: deviceName, ...(bandwidth ? { bandwidthBytesPerSecond: bandwidth } : {}) } }),
    runs,
    ratios: ratioRows(runs),
  };
  const files = writeReport(report, o.outDir);
  o.log(`done in ${progress.elapsed()}`);
  return { report, files };
}

/** What every report opens with: date, duration since `started` (performance.now()), machine, device, commits, settings. */
export function reportHeader(o: { started: number; settings: BenchSettings; device: BenchReport['device'] }): Omit<BenchReport, 'runs' | 'ratios'> {
  return {
    version: 1,
    date: new Date().toISOString(),
    durationSeconds: (performance.now() - o.started) / 1000,
    machine: { host: hostname(), os: `${type()} ${release()}`, cpu: cpus()[0]?.model.trim() ?? 'unknown', cores: availableParallelism(), memoryBytes: totalmem() },
    device: o.device,
    commit: gitCommit(),
    llamaCommit: LLAMA_COMMIT,
    settings: o.settings,
  };
}

/** Writes report.json, report.md and report.html into `outDir` (created if needed). */
export function writeReport(report: BenchReport, outDir: string): BenchOutcome['files'] {
  mkdirSync(outDir, { recursive: true });
  const files = { json: join(outDir, 'report.json'), markdown: join(outDir, 'report.md'), html: join(outDir, 'report.html') };
  writeFileSync(files.json, `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(files.markdown, renderMarkdown(report));
  writeFileSync(files.html, renderHtml(report));
  return files;
}

export { formatRatioTable };
