/**
 * Logit fusion overhead: what fusing two models costs beyond running both. On two synthetic models
 * of one preset (same shape and tokenizer, different weights: seeds 1 and 2), at each number of
 * concurrent streams, greedy generation throughput of
 *
 *   A alone, B alone     `streams` generations on one model
 *   A and B separately   `streams` generations on each model at the same time (the same decode
 *                        work as fusion: both models step every sequence), counted per model
 *   fused A+B            `streams` fused generations (each step waits for both members' logits,
 *                        sums their log-softmaxes in JS, feeds the choice back to both)
 *
 * overhead = fused / separately: 1 means fusion adds nothing to running both models; below 1 is
 * the price of lockstep (the faster member waits for the slower) and of sampling in JS.
 * Throughput is end to end (short prompts, submit to last token), best of `repeat` rounds, the
 * variants interleaved in each round so that a slow spell of a shared machine hits all of them.
 */
import { fuse } from '../fusion.js';
import type { Generation } from '../generation.js';
import { loadModel, type Model } from '../model.js';
import { makeSyntheticModel } from '../synthetic/models.js';
import { MODEL_PRESETS, specLabel, type BenchModelSpec } from './models.js';
import type { FusionBenchResult, FusionBenchRow } from './types.js';

export interface FusionBenchOptions {
  /** The preset of both members: A has its weights of seed 1, B those of seed 2. */
  model: BenchModelSpec;
  /** Concurrent streams per measurement, e.g. [1, 4]. */
  streams: number[];
  /** Tokens generated per stream. */
  genTokens: number;
  /** Fusion weights of A and B. Default [0.5, 0.5]. */
  weights?: [number, number];
  threads: number;
  batchSize: number;
  gpuLayers: number;
  repeat: number;
  modelCacheDir?: string;
  log: (line: string) => void;
}

/** The preset's model as ensureBenchModel makes it (seed 1 is the very same file), with another seed for B. */
function memberModel(spec: BenchModelSpec, seed: number, cacheDir: string | undefined): Promise<string> {
  const preset = MODEL_PRESETS[spec.preset];
  return makeSyntheticModel({
    ...preset.options,
    nLayer: spec.layers ?? preset.realLayers,
    type: spec.type,
    shareLayerWeights: true,
    seed,
    ...(cacheDir ? { cacheDir } : {}),
  });
}

/** One prompt per stream, so that no stream reuses another's prompt cache. */
const prompt = (i: number) => `Stream ${i + 1}: the history of the old city begins with`;

/** Starts the generations, waits for all; generated tokens (all streams) per second of wall time. */
async function throughput(start: () => Generation[]): Promise<number> {
  const started = performance.now();
  const results = await Promise.all(start().map((g) => g.result));
  const seconds = (performance.now() - started) / 1000;
  return results.reduce((n, r) => n + r.usage.completionTokens, 0) / seconds;
}

export async function measureFusion(o: FusionBenchOptions): Promise<FusionBenchResult> {
  if (o.streams.length === 0 || o.streams.some((s) => !Number.isInteger(s) || s < 1)) throw new RangeError('streams must be positive integers');
  if (!Number.isInteger(o.repeat) || o.repeat < 1) throw new RangeError('repeat must be at least 1');
  const weights = o.weights ?? [0.5, 0.5];
  const steps = 1 + o.repeat * o.streams.length * 4;
  let step = 0;
  const started = performance.now();
  const progress = (what: string) => {
    const s = Math.round((performance.now() - started) / 1000);
    o.log(`[${++step}/${steps} ${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s] ${what}`);
  };

  const label = specLabel(o.model);
  progress(`preparing ${label} with seeds 1 (A) and 2 (B) (generated once, then cached)`);
  const pathA = await memberModel(o.model, 1, o.modelCacheDir);
  const pathB = await memberModel(o.model, 2, o.modelCacheDir);
  const maxStreams = Math.max(...o.streams);
  const load = {
    contextSize: Math.ceil((32 + o.genTokens + 8) / 64) * 64,
    maxSequences: maxStreams,
    batchSize: o.batchSize,
    threads: o.threads,
    gpuLayers: o.gpuLayers,
  };
  const a = await loadModel(pathA, load);
  let b: Model | undefined;
  try {
    b = await loadModel(pathB, load);
    const members = [{ model: a, weight: weights[0] }, { model: b, weight: weights[1] }];
    const fused = fuse(members);
    const greedy = { maxTokens: o.genTokens, temperature: 0, ignoreEos: true };
    const on = (model: Model, n: number) => Array.from({ length: n }, (_, i) => model.generate(prompt(i), greedy));
    // Warm-up: compute graphs and pages of both engines, and the fused path.
    await Promise.all([a.complete(prompt(0), { ...greedy, maxTokens: 4 }), b.complete(prompt(0), { ...greedy, maxTokens: 4 })]);
    await fused.complete(prompt(0), { ...greedy, maxTokens: 4 });

    const rows = new Map<number, FusionBenchRow>(o.streams.map((n) => [n, { streams: n, a: 0, b: 0, separately: 0, fused: 0, overhead: 0 }]));
    for (let round = 0; round < o.repeat; round++) {
      const tag = o.repeat > 1 ? `, round ${round + 1}/${o.repeat}` : '';
      for (const n of o.streams) {
        const row = rows.get(n)!;
        const what = `${n} stream${n === 1 ? '' : 's'} × ${o.genTokens} tokens${tag}`;
        progress(`A alone: ${what}`);
        row.a = Math.max(row.a, await throughput(() => on(a, n)));
        progress(`B alone: ${what}`);
        row.b = Math.max(row.b, await throughput(() => on(b!, n)));
        progress(`A and B separately, at the same time: ${what} each`);
        // Per model: half the tokens of both, i.e. how fast each text advances.
        row.separately = Math.max(row.separately, (await throughput(() => [...on(a, n), ...on(b!, n)])) / 2);
        progress(`fused A+B: ${what}`);
        row.fused = Math.max(row.fused, await throughput(() => Array.from({ length: n }, (_, i) => fused.generate(prompt(i), greedy))));
      }
    }
    const out = [...rows.values()].map((row) => ({ ...row, overhead: row.fused / row.separately }));
    for (const row of out) {
      o.log(
        `${row.streams} stream${row.streams === 1 ? '' : 's'}: A ${row.a.toFixed(1)} t/s, B ${row.b.toFixed(1)} t/s, separately ${row.separately.toFixed(1)} t/s each, ` +
          `fused ${row.fused.toFixed(1)} t/s (${row.overhead.toFixed(2)} × separately)`,
      );
    }
    return {
      a: `${label} seed 1`,
      b: `${label} seed 2`,
      weights,
      genTokens: o.genTokens,
      threads: o.threads,
      gpuLayers: o.gpuLayers,
      vocabSize: a.info.vocabSize,
      // The devices holding layers (none on a CPU-only run: the report then names the CPU).
      offload: a.info.placement.devices.filter((d) => !d.host && d.layers.length > 0).map((d) => (d.kind === 'rpc' ? `${d.device} (${d.description})` : d.device)),
      rows: out,
    };
  } finally {
    await b?.dispose();
    await a.dispose();
  }
}

export function formatFusionTable(r: FusionBenchResult): string {
  const lines = [
    `A ${r.a}, B ${r.b} (same tokenizer, ${r.vocabSize} tokens), weights ${r.weights.join(' / ')}, ${r.genTokens} tokens per stream, greedy, ` +
      `${r.threads} thread${r.threads === 1 ? '' : 's'} per model${r.gpuLayers ? `, ${r.gpuLayers} GPU layers` : ''}`,
    '',
    '| streams | A alone t/s | B alone t/s | A and B separately, same time (t/s per model) | fused A+B t/s | overhead (fused / separately) |',
    '|--:|--:|--:|--:|--:|--:|',
  ];
  for (const row of r.rows) {
    lines.push(`| ${row.streams} | ${row.a.toFixed(1)} | ${row.b.toFixed(1)} | ${row.separately.toFixed(1)} | ${row.fused.toFixed(1)} | ${row.overhead.toFixed(2)} |`);
  }
  return lines.join('\n');
}
