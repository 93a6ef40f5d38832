/** `genesis bench` (also `npm run bench -- ...`): the benchmark harness from the command line. */
import { existsSync } from 'node:fs';
import { availableParallelism, cpus } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

import { measureDeterminism } from '../bench/determinism.js';
import { formatFusionTable, measureFusion } from '../bench/fusion.js';
import { formatSpeculativeTable, measureSpeculative } from '../bench/speculative.js';
import { ensureBenchModel, isPresetName, MODEL_PRESETS, parseModelSpec, specLabel, type BenchModelSpec, type ModelPreset } from '../bench/models.js';
import { defaultBenchOptions, formatRatioTable, reportHeader, runBench, writeReport, WORKLOADS, type Workload } from '../bench/run.js';
import { systemInfo } from '../system.js';
import { repoRoot } from '../synthetic/models.js';
import type { SyntheticWeightType } from '../synthetic/models.js';
import type { SplitSettings } from '../bench/types.js';
import { UsageError } from './usage-error.js';

export const BENCH_USAGE = `bench options (figures printed next to llama.cpp's own tools, built from the same source):
  --quick               a small version of everything (a few minutes on 2 cores)
  --model SPEC          a model: a GGUF file, or a preset shape generated once and cached:
                        ${Object.keys(MODEL_PRESETS).join(', ')}, as preset[:type[:layers]]
                        (type f16, q8_0 or q4_0); repeatable (default: both real shapes)
  --type T              default type for presets without one (default q4_0 with --quick)
  --layers N            default layer count for presets without one
  --workloads LIST      ${WORKLOADS.join(',')} (default: all)
  --concurrency LIST    batched and server sweep, e.g. 1,2,4,8,16,32,64
  --pp LIST             single-stream prompt lengths (llama-bench -p)
  --tg N                single-stream generated tokens (llama-bench -n)
  --repeat N            interleaved rounds, best kept (default 2 quick, 3 full)
  --threads N --batch-size N --gpu-layers N
  --split-mode M --tensor-split A,B --main-gpu I --rpc HOST:PORT[,...]
                        several devices or genesis rpc-servers, for ours and every reference alike
  --kv-paged            our server with paged attention over one shared KV pool (server --kv-paged)
                        in the server, shared-prefix, mixed and kv-pool workloads
  --kv-block-size N     with --kv-paged: the pool's cells in aligned blocks of N (server --kv-block-size)
  --kv-swap SIZE        ours copies preempted sequences' KV to host memory (server --kv-swap) in the
                        kv-pool workload, and with --kv-paged in the server workloads
  --fused-moe-routing   ours with group-limited MoE routing in one op (loadModel fusedMoeRouting) in
                        the single, batched and server workloads
  --no-roofline         skip the bandwidth measurement and roofline
  --determinism N       instead: N greedy requests (e.g. 200) alone, then all at once, in the
                        default and the deterministic mode; how many equal their solo run, and
                        the throughput of each (first --model; default the tiny preset)
  --speculative         instead: speculative decoding against llama-speculative-simple at several
                        acceptance rates (--scales 0.2,0.5,0.8: how much the target's layers 1+
                        are scaled; draft = its first layer), --draft-max N (4), --tg N (64);
                        first --model as target (default llama-3-8b:q4_0:4).
                        With --mtp the target's own MTP layer drafts, against --spec-type draft-mtp
                        (every layer scaled; default glm-4.5-air:q4_0:1)
  --fusion              instead: logit fusion overhead: two models of the first --model's preset (seeds
                        1 and 2, same tokenizer; default llama-3-8b:q4_0:2) alone, both at the same
                        time, and fused, at --concurrency 1,4 streams, --tg N (64) tokens each;
                        written into the report
  --out DIR             where report.json, report.md and report.html go
                        (default benchmarks/out/<date>)
`;

function list(name: string, value: string | undefined): number[] | undefined {
  if (value === undefined) return undefined;
  const items = value.split(',').map((v) => Number(v.trim()));
  if (items.length === 0 || items.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new UsageError(`--${name} expects a comma-separated list of positive integers, got ${JSON.stringify(value)}`);
  }
  return items;
}

/** A size argument: 6G, 512M, 1.5GiB or a number of bytes. */
export function bytes(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(value.trim());
  if (!m) throw new UsageError(`--${name} expects a size such as 6G, 512M or a number of bytes, got ${JSON.stringify(value)}`);
  const scale = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.floor(Number(m[1]) * scale);
}

function positive(name: string, value: string | undefined, min = 1): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < min) throw new UsageError(`--${name} expects an integer ≥ ${min}, got ${JSON.stringify(value)}`);
  return n;
}

const SPLIT_MODES = ['none', 'layer', 'row', 'tensor'] as const;

/** --split-mode, --tensor-split, --main-gpu and --rpc, checked: for genesis bench and the model commands alike. */
export function splitSettings(values: { 'split-mode'?: string; 'tensor-split'?: string; 'main-gpu'?: string; rpc?: string }): SplitSettings {
  const split: SplitSettings = {};
  const mode = values['split-mode'];
  if (mode !== undefined) {
    if (!(SPLIT_MODES as readonly string[]).includes(mode)) throw new UsageError(`--split-mode expects one of ${SPLIT_MODES.join(', ')}, got ${JSON.stringify(mode)}`);
    split.splitMode = mode as SplitSettings['splitMode'];
  }
  if (values['tensor-split'] !== undefined) {
    const parts = values['tensor-split'].split(/[,/]/).map(Number);
    if (parts.some((x) => !Number.isFinite(x) || x < 0)) throw new UsageError(`--tensor-split expects proportions such as 3,1, got ${JSON.stringify(values['tensor-split'])}`);
    split.tensorSplit = parts;
  }
  split.mainGpu = positive('main-gpu', values['main-gpu'], 0);
  if (split.mainGpu === undefined) delete split.mainGpu;
  if (values.rpc !== undefined) split.rpcServers = values.rpc.split(',').map((x) => x.trim()).filter(Boolean);
  return split;
}

export async function benchCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      model: { type: 'string', short: 'm', multiple: true },
      type: { type: 'string' },
      layers: { type: 'string' },
      workloads: { type: 'string' },
      concurrency: { type: 'string' },
      pp: { type: 'string' },
      tg: { type: 'string' },
      repeat: { type: 'string' },
      threads: { type: 'string', short: 't' },
      'batch-size': { type: 'string' },
      'gpu-layers': { type: 'string' },
      'split-mode': { type: 'string' },
      'tensor-split': { type: 'string' },
      'main-gpu': { type: 'string' },
      rpc: { type: 'string' },
      'no-roofline': { type: 'boolean' },
      'kv-paged': { type: 'boolean' },
      'kv-block-size': { type: 'string' },
      'kv-swap': { type: 'string' },
      'fused-moe-routing': { type: 'boolean' },
      determinism: { type: 'string' },
      speculative: { type: 'boolean' },
      mtp: { type: 'boolean' },
      scales: { type: 'string' },
      'draft-max': { type: 'string' },
      fusion: { type: 'boolean' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(BENCH_USAGE);
    return 0;
  }
  if (values.fusion && (values.speculative || values.determinism !== undefined)) throw new UsageError('--fusion, --speculative and --determinism are separate runs: give one');
  const quick = values.quick ?? false;
  const o = defaultBenchOptions(quick);
  const type = (values.type ?? 'q4_0') as SyntheticWeightType;
  const layers = positive('layers', values.layers);
  if (values.model) {
    o.models = values.model.map((spec): BenchModelSpec | string => {
      if (isPresetName(spec.split(':')[0]!)) {
        try {
          return parseModelSpec(spec, { type, ...(layers ? { layers } : {}) });
        } catch (error) {
          throw new UsageError((error as Error).message);
        }
      }
      if (!existsSync(spec)) {
        throw new UsageError(`--model ${JSON.stringify(spec)} is neither a GGUF file nor a preset (${Object.keys(MODEL_PRESETS).join(', ')})`);
      }
      return resolve(spec);
    });
  } else if (values.type || layers) {
    o.models = o.models.map((m) => (typeof m === 'string' ? m : { ...m, ...(values.type ? { type } : {}), ...(layers ? { layers } : {}) }));
  }
  if (values.workloads) {
    const chosen = values.workloads.split(',').map((w) => w.trim());
    const unknown = chosen.filter((w) => !(WORKLOADS as readonly string[]).includes(w));
    if (unknown.length > 0) throw new UsageError(`unknown workload ${unknown.join(', ')}: expected some of ${WORKLOADS.join(', ')}`);
    o.workloads = new Set(chosen as Workload[]);
  }
  o.concurrency = list('concurrency', values.concurrency) ?? o.concurrency;
  o.ppTokens = list('pp', values.pp) ?? o.ppTokens;
  o.tgTokens = positive('tg', values.tg, 2) ?? o.tgTokens;
  o.repeat = positive('repeat', values.repeat) ?? o.repeat;
  o.threads = positive('threads', values.threads) ?? o.threads;
  o.batchSize = positive('batch-size', values['batch-size']) ?? o.batchSize;
  o.gpuLayers = positive('gpu-layers', values['gpu-layers'], 0) ?? o.gpuLayers;
  if (values['no-roofline']) o.roofline = false;
  if (values['kv-paged']) o.kvPaged = true;
  o.kvBlockSize = positive('kv-block-size', values['kv-block-size']) ?? o.kvBlockSize;
  if (o.kvBlockSize > 1 && !o.kvPaged) throw new UsageError('--kv-block-size needs --kv-paged: blocks are cells of the paged pool');
  o.kvSwapMemory = bytes('kv-swap', values['kv-swap']) ?? o.kvSwapMemory;
  if (values['fused-moe-routing']) o.fusedMoeRouting = true;
  o.split = splitSettings(values);
  if (values.determinism !== undefined) {
    const requests = positive('determinism', values.determinism);
    const first = o.models[0] ?? { preset: 'tiny', type: 'q4_0' };
    const spec = values.model ? first : ({ preset: 'tiny', type: (values.type ?? 'q4_0') as SyntheticWeightType, layers: layers ?? 4 } as BenchModelSpec);
    const path = typeof spec === 'string' ? spec : await ensureBenchModel(spec);
    const concurrency = list('concurrency', values.concurrency)?.[0] ?? 16;
    const r = await measureDeterminism({
      model: path, requests: requests ?? 200, concurrency, maxTokens: positive('tg', values.tg, 2) ?? 32, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers,
      log: (line) => process.stderr.write(`[bench] ${line}\n`),
    });
    process.stdout.write(`\n${r.requests} requests, ${r.maxTokens} tokens each, ${r.concurrency} at a time, ${typeof spec === 'string' ? spec : specLabel(spec)}\n\n`);
    process.stdout.write('| mode | equal to their solo run | tokens/s |\n|---|--:|--:|\n');
    for (const m of r.modes) process.stdout.write(`| ${m.mode} | ${m.equal} / ${m.requests} | ${m.tokensPerSecond.toFixed(1)} |\n`);
    const [d, det] = r.modes;
    if (d && det) process.stdout.write(`\ndeterministic throughput: ${(det.tokensPerSecond / d.tokensPerSecond).toFixed(2)} × default\n`);
    return r.modes.every((m) => m.mode !== 'deterministic' || m.equal === m.requests) ? 0 : 1;
  }
  if (values.mtp && !values.speculative) throw new UsageError('--mtp goes with --speculative');
  if (values.speculative) {
    const first = values.model ? o.models[0] : undefined;
    if (typeof first === 'string') throw new UsageError('--speculative needs a preset --model (its draft is generated from it), not a file');
    const mtp = values.mtp ?? false;
    const target: BenchModelSpec = first ?? { preset: mtp ? 'glm-4.5-air' : 'llama-3-8b', type: (values.type ?? 'q4_0') as SyntheticWeightType, layers: layers ?? (mtp ? 1 : 4) };
    const withMtp = Object.entries(MODEL_PRESETS as Record<string, ModelPreset>).filter(([, p]) => p.options.mtpLayers).map(([n]) => n);
    if (mtp && !withMtp.includes(target.preset)) throw new UsageError(`--mtp needs a preset with an MTP layer (${withMtp.join(', ')}), not ${target.preset}`);
    const scales = values.scales?.split(',').map(Number) ?? [0.2, 0.5, 0.8];
    if (scales.some((x) => !Number.isFinite(x) || x < 0)) throw new UsageError(`--scales expects numbers ≥ 0, got ${JSON.stringify(values.scales)}`);
    const r = await measureSpeculative({
      target, scales, draftTokens: positive('draft-max', values['draft-max']) ?? 4, genTokens: positive('tg', values.tg, 2) ?? 64,
      threads: o.threads, gpuLayers: o.gpuLayers, repeat: positive('repeat', values.repeat) ?? 1, mtp, log: (line) => process.stderr.write(`[bench] ${line}\n`),
    });
    process.stdout.write(`\n${formatSpeculativeTable(r)}\n`);
    return 0;
  }
  const outDir = resolve(values.out ?? join(repoRoot(), 'benchmarks', 'out', new Date().toISOString().replace(/[:.]/g, '-')));
  if (values.fusion) {
    const first = values.model ? o.models[0] : undefined;
    if (typeof first === 'string') throw new UsageError('--fusion needs a preset --model (its two members are generated from it), not a file');
    const model: BenchModelSpec = first ?? { preset: 'llama-3-8b', type: (values.type ?? 'q4_0') as SyntheticWeightType, layers: layers ?? 2 };
    const started = performance.now();
    const streams = list('concurrency', values.concurrency) ?? [1, 4];
    const repeat = positive('repeat', values.repeat) ?? (quick ? 1 : 2);
    const r = await measureFusion({
      model, streams, genTokens: positive('tg', values.tg, 2) ?? 64, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, repeat,
      log: (line) => process.stderr.write(`[bench] ${line}\n`),
    });
    const cpu = `${cpus()[0]?.model.trim() ?? 'CPU'} ×${availableParallelism()}`;
    const files = writeReport(
      {
        ...reportHeader({
          started,
          settings: { quick, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers, split: {}, repeat, concurrency: streams, ppTokens: [], tgTokens: r.genTokens },
          device: { variant: systemInfo().variant, name: r.offload.length ? r.offload.join(', ') : cpu },
        }),
        runs: [],
        ratios: [],
        fusion: r,
      },
      outDir,
    );
    process.stdout.write(`\nreport: ${files.html}\n        ${files.markdown}\n        ${files.json}\n\n${formatFusionTable(r)}\n`);
    return 0;
  }

  const { report, files } = await runBench({ ...o, outDir, log: (line) => process.stderr.write(`[bench] ${line}\n`) });
  process.stdout.write(`\nreport: ${files.html}\n        ${files.markdown}\n        ${files.json}\n\n`);
  process.stdout.write(`${formatRatioTable(report.ratios)}\n`);
  return 0;
}
