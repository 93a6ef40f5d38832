// Where a decode step's time goes on the GPU (benchmarks/gpu.sh profile), at several batch sizes,
// for one model (default the Qwen3-30B-A3B-shaped MoE at Q4_0, every layer on the GPU):
//   node benchmarks/gpu-profile.mjs time [SPEC]            per step, without a profiler: wall time,
//        the llama_decode call (graph build + launches), the wait for the GPU, sampling, the rest
//   ncu --profile-from-start off ... node benchmarks/gpu-profile.mjs kernels B [SPEC]
//        B sequences decoding; the profiler range (cudaProfilerRange) covers PROFILE_STEPS steps
//   node benchmarks/gpu-profile.mjs summarize DIR          ncu CSVs (ncu-B.csv) + time.json -> profile.md
// Batch sizes: PROFILE_BATCHES (default 1,8,64).
import { readFileSync, readdirSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';

import { cudaProfilerRange, loadModel } from '../dist/index.js';
import { ensureBenchModel, parseModelSpec } from '../dist/bench/models.js';
import { mulberry32 } from '../dist/synthetic/models.js';
import { randomPrompt } from '../dist/bench/worker.js';

const OUT = process.env.OUT ?? join(process.cwd(), 'benchmarks', 'out', 'gpu');
const BATCHES = (process.env.PROFILE_BATCHES ?? '1,8,64').split(',').map(Number);
const say = (line) => process.stderr.write(`[profile] ${line}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function load(spec) {
  const path = await ensureBenchModel(parseModelSpec(spec, { type: 'q4_0' }));
  return loadModel(path, { gpuLayers: 'max', contextSize: 1024, maxSequences: Math.max(...BATCHES), batchSize: 512 });
}

/** Starts `b` endless greedy generations and resolves once every one is past its prompt. */
async function decoding(model, b) {
  const random = mulberry32(b);
  const controller = new AbortController();
  const produced = new Array(b).fill(0);
  const runs = Array.from({ length: b }, async (_, i) => {
    const g = model.generate(randomPrompt(random, model.info.vocabSize, 32), { maxTokens: 900, temperature: 0, ignoreEos: true, signal: controller.signal });
    try {
      for await (const chunk of g) produced[i] += chunk.tokens.length;
    } catch {
      // aborted at the end of the measurement
    }
  });
  while (Math.min(...produced) < 4) await sleep(5);
  return {
    stop: async () => {
      controller.abort();
      await Promise.all(runs);
    },
  };
}

async function waitSteps(model, n) {
  const start = model.stats().steps;
  while (model.stats().steps - start < n) await sleep(1);
}

async function timeMode(spec) {
  const model = await load(spec);
  const rows = [];
  for (const b of BATCHES) {
    const run = await decoding(model, b);
    await waitSteps(model, 5);
    const s0 = model.stats();
    const t0 = performance.now();
    await sleep(3000);
    const s1 = model.stats();
    const wall = (performance.now() - t0) / 1000;
    await run.stop();
    const steps = s1.steps - s0.steps;
    const per = (k) => ((s1.seconds[k] - s0.seconds[k]) / steps) * 1000;
    const row = {
      batch: b,
      steps,
      stepMs: (wall / steps) * 1000,
      tokensPerSecond: (s1.decodedTokens - s0.decodedTokens) / wall,
      decodeCallMs: per('decode'),
      gpuWaitMs: per('wait'),
      sampleMs: per('sample'),
      engineOtherMs: per('step') - per('decode') - per('wait') - per('sample'),
    };
    rows.push(row);
    say(`B=${b}: ${row.stepMs.toFixed(2)} ms/step, ${row.tokensPerSecond.toFixed(0)} t/s; llama_decode call ${row.decodeCallMs.toFixed(2)} ms, GPU wait ${row.gpuWaitMs.toFixed(2)}, sampling ${row.sampleMs.toFixed(2)}, other ${row.engineOtherMs.toFixed(2)}`);
  }
  await model.dispose();
  writeFileSync(join(OUT, 'time.json'), JSON.stringify({ model: spec, rows }, null, 2));
}

async function kernelsMode(b, spec) {
  const steps = Number(process.env.PROFILE_STEPS ?? 4);
  const model = await load(spec);
  const run = await decoding(model, b);
  await waitSteps(model, 3);
  const s0 = model.stats().steps;
  if (!cudaProfilerRange(true)) throw new Error('cudaProfilerStart failed (is this the CUDA build?)');
  await waitSteps(model, steps);
  cudaProfilerRange(false);
  const counted = model.stats().steps - s0;
  await run.stop();
  await model.dispose();
  writeFileSync(join(OUT, `steps-${b}.json`), JSON.stringify({ batch: b, steps: counted }));
  say(`B=${b}: profiled about ${counted} steps`);
}

/** RFC 4180 line split (ncu quotes every field). */
function csvFields(line) {
  const out = [];
  let cur = '';
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') {
        cur += '"';
        i++;
      } else if (c === '"') quoted = false;
      else cur += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      out.push(cur);
      cur = '';
    } else cur += c;
  }
  out.push(cur);
  return out;
}

/** Kernel launches in order: { name, ns }, from ncu's --csv output (details or raw page). */
function readNcu(file) {
  const lines = readFileSync(file, 'utf8').split('\n');
  const h = lines.findIndex((l) => l.startsWith('"ID"'));
  if (h < 0) return [];
  const header = csvFields(lines[h]);
  const col = (name) => header.indexOf(name);
  const kernels = new Map();
  for (const line of lines.slice(h + 1)) {
    if (!line.startsWith('"')) continue;
    const f = csvFields(line);
    const id = f[col('ID')];
    let ns;
    if (col('Metric Name') >= 0) {
      if (f[col('Metric Name')] !== 'gpu__time_duration.sum') continue;
      const unit = f[col('Metric Unit')];
      const v = Number(String(f[col('Metric Value')]).replace(/,/g, ''));
      ns = unit === 'usecond' ? v * 1e3 : unit === 'msecond' ? v * 1e6 : unit === 'second' ? v * 1e9 : v;
    } else {
      const c = header.findIndex((n) => n.startsWith('gpu__time_duration'));
      ns = Number(String(f[c]).replace(/,/g, ''));
    }
    if (Number.isFinite(ns)) kernels.set(id, { name: f[col('Kernel Name')], ns });
  }
  return [...kernels.values()];
}

/**
 * Categories for a decode step. Expert matrix products are the matrix kernels launched between an
 * MoE routing kernel and the next normalisation (llama.cpp's kernel names do not say whether a
 * mul_mat_q serves experts or a dense weight).
 */
function categorize(kernels) {
  const totals = new Map();
  let inMoe = false;
  for (const k of kernels) {
    const n = k.name;
    let cat;
    if (/rms_norm|norm_f32/.test(n)) {
      inMoe = false;
      cat = 'norms';
    } else if (/flash_attn|fattn|soft_max/.test(n)) cat = 'attention';
    else if (/topk_moe|argsort|mm_ids_helper|top_k|moe_weighted|argmax/.test(n)) {
      inMoe = true;
      cat = 'routing';
    } else if (/mul_mat|gemm|gemv|xmma|cutlass|cublas|quantize_q8_1|quantize_mmq/.test(n)) cat = inMoe || /_moe/.test(n) ? 'expert matmuls' : 'dense matmuls (attention projections, router, LM head)';
    else if (/rope/.test(n)) cat = 'rope';
    else if (/get_rows|set_rows|cpy|copy/.test(n)) cat = 'copies (get_rows, KV writes)';
    else cat = 'elementwise and other';
    totals.set(cat, (totals.get(cat) ?? 0) + k.ns);
  }
  return totals;
}

function summarize(dir) {
  const time = existsSync(join(dir, 'time.json')) ? JSON.parse(readFileSync(join(dir, 'time.json'), 'utf8')) : { rows: [] };
  const lines = [`# Decode-step profile: ${time.model ?? ''}`, ''];
  for (const file of readdirSync(dir).filter((f) => /^ncu-\d+\.csv$/.test(f)).sort((a, b) => parseInt(a.slice(4)) - parseInt(b.slice(4)))) {
    const b = Number(/\d+/.exec(file)[0]);
    const kernels = readNcu(join(dir, file));
    const stepsFile = join(dir, `steps-${b}.json`);
    const steps = existsSync(stepsFile) ? JSON.parse(readFileSync(stepsFile, 'utf8')).steps : 1;
    const t = time.rows.find((r) => r.batch === b);
    const gpuMs = kernels.reduce((s, k) => s + k.ns, 0) / 1e6 / steps;
    lines.push(`## Batch ${b}: ${kernels.length} kernels over ${steps} steps; kernel time ${gpuMs.toFixed(3)} ms per step`);
    if (t) {
      lines.push('', `Without the profiler: ${t.stepMs.toFixed(3)} ms per step (${t.tokensPerSecond.toFixed(0)} t/s): llama_decode call ${t.decodeCallMs.toFixed(3)} ms, GPU wait ${t.gpuWaitMs.toFixed(3)}, sampling (host) ${t.sampleMs.toFixed(3)}, engine other ${t.engineOtherMs.toFixed(3)}; step time not covered by kernels (host overhead, launch gaps) ≈ ${(t.stepMs - gpuMs).toFixed(3)} ms (${(((t.stepMs - gpuMs) / t.stepMs) * 100).toFixed(0)} %).`);
    }
    lines.push('', '| category | ms per step | share of kernel time |', '|---|--:|--:|');
    const cats = [...categorize(kernels)].sort((x, y) => y[1] - x[1]);
    const total = kernels.reduce((s, k) => s + k.ns, 0);
    for (const [cat, ns] of cats) lines.push(`| ${cat} | ${(ns / 1e6 / steps).toFixed(3)} | ${((ns / total) * 100).toFixed(1)} % |`);
    const byName = new Map();
    for (const k of kernels) {
      const short = k.name.replace(/\(.*$/, '').slice(0, 110);
      const e = byName.get(short) ?? { ns: 0, n: 0 };
      e.ns += k.ns;
      e.n++;
      byName.set(short, e);
    }
    lines.push('', '| kernel | launches per step | ms per step |', '|---|--:|--:|');
    for (const [name, e] of [...byName].sort((x, y) => y[1].ns - x[1].ns).slice(0, 15)) lines.push(`| \`${name}\` | ${(e.n / steps).toFixed(0)} | ${(e.ns / 1e6 / steps).toFixed(3)} |`);
    lines.push('');
  }
  const text = lines.join('\n');
  writeFileSync(join(dir, 'profile.md'), text);
  console.log(text);
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 'time') await timeMode(args[0] ?? 'qwen3-30b-a3b:q4_0');
else if (mode === 'kernels') await kernelsMode(Number(args[0]), args[1] ?? 'qwen3-30b-a3b:q4_0');
else if (mode === 'summarize') summarize(args[0] ?? OUT);
else {
  console.error('usage: node benchmarks/gpu-profile.mjs time [SPEC] | kernels B [SPEC] | summarize [DIR]');
  process.exit(2);
}
