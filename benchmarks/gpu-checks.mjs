// GPU correctness on the lent machine (benchmarks/gpu.sh checks), against the CPU on the same
// fixtures, with the built dist/:
//   logits      each fixture runs greedily on the CPU (a child process that sees no GPU), and the
//               GPU is then fed the same tokens: per step, the relative L2 distance of the two logit
//               vectors, the largest absolute difference, and whether the choices agree; then the
//               GPU decodes greedily on its own and we say where (if anywhere) it parts from the CPU
//               and how close the CPU's two best logits were there.
//   concurrent  N requests at once on the GPU against each run alone, default and deterministic mode
//   memory      20 load/dispose cycles leave the device's free memory where it was
//   paged       paged attention (kvPaged) on the GPU against the standard cache on the GPU, fed the
//               same tokens (logits, greedy path), per architecture and for q8_0 and q4_0 KV caches
//               (kvCacheType); then 16 requests at once in a
//               pool 4× too small, against each one's solo paged run
//   routing     fusedMoeRouting on the GPU (patch 0009: a DeepSeek-V3 layer's routing in one
//               kernel) against upstream's chain on the GPU, fed the same tokens (logits, greedy
//               path), and the experts each layer counted, for models with expert groups
//   swap        16 requests of 64 + 192 tokens in a pool of a quarter of what they need (all are
//               admitted, then outgrow it), with
//               preempted sequences recomputed (kvSwapMemory 0) and copied to host memory and back
//               (kvSwapMemory 8 GiB), standard, paged and paged in blocks of 16: wall time, tokens decoded, preemptions,
//               copies, and how many outputs the two ways share (SWAP_MODEL, default llama-3-8b:q4_0:2;
//               on the GPU when the addon has one, else the CPU)
//   placement   decode of a MoE model whose experts do not all fit (PLACE_MODEL, default
//               deepseek-v3:q4_0:2), at the same device memory for experts: upstream's --n-cpu-moe
//               choice (cpuMoeLayers: the first half of the layers' experts in host memory) against
//               expert placement (gpuExperts: that many experts of every layer copied to the GPU, the
//               hottest by a counting run's expertStats); and all experts on the GPU. Tokens per
//               second at 1 and 8 sequences, the share of routed picks the copies took, and how
//               many greedy outputs equal the all-on-GPU run's (each side runs its own kernels);
//               then llama-bench from the same source, all on the GPU and with -ncmoe, decode alone
// Prints one line per result and writes checks.json to $OUT. Usage:
//   node benchmarks/gpu-checks.mjs [logits|concurrent|memory|paged|routing|swap|placement|all]
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';

import { estimateMemory, loadModel, systemInfo } from '../dist/index.js';
import { ensureBenchModel, parseModelSpec } from '../dist/bench/models.js';
import { measureDeterminism } from '../dist/bench/determinism.js';
import { ensureDefaultModel } from '../dist/synthetic/default-model.js';
import { makeSyntheticModel, mulberry32 } from '../dist/synthetic/models.js';
import { parseLlamaBenchJson, runTool } from '../dist/bench/reference.js';
import { ensureReferenceTool } from '../scripts/llama.mjs';

const OUT = process.env.OUT ?? join(process.cwd(), 'benchmarks', 'out', 'gpu');
mkdirSync(OUT, { recursive: true });
const STEPS = Number(process.env.CHECK_STEPS ?? 48);
const PROMPT = 'The history of the printing press begins';

/** The fixtures: the demo model, small synthetic shapes of each architecture, real-width slices. */
const FIXTURES = [
  { name: 'default (tiny llama, f16)', make: () => ensureDefaultModel() },
  { name: 'qwen3moe f16 2L', make: () => makeSyntheticModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 2, nEmbd: 256 }) },
  { name: 'glm4moe f16 2L (sigmoid routing, bias, shared expert)', make: () => makeSyntheticModel({ arch: 'glm4moe', vocab: 'qwen2', type: 'f16', nLayer: 2, nEmbd: 256 }) },
  {
    name: 'qwen35 f16 4L (3 Gated DeltaNet + 1 attention)',
    make: () => makeSyntheticModel({ arch: 'qwen35', vocab: 'qwen2', type: 'f16', nLayer: 4, nEmbd: 256, nHead: 4, nHeadKv: 2, headDim: 64, nFf: 512 }),
  },
  { name: 'qwen3-30b-a3b:q4_0:2', make: () => ensureBenchModel(parseModelSpec('qwen3-30b-a3b:q4_0:2', { type: 'q4_0' })) },
  { name: 'qwen3-30b-a3b:q8_0:2', make: () => ensureBenchModel(parseModelSpec('qwen3-30b-a3b:q8_0:2', { type: 'q8_0' })) },
  { name: 'llama-3-8b:q4_0:2', make: () => ensureBenchModel(parseModelSpec('llama-3-8b:q4_0:2', { type: 'q4_0' })) },
];

const say = (line) => console.log(`[checks] ${line}`);

/**
 * Feeds `forced` tokens (or the argmax of each step when absent) after the prompt and returns every
 * step's logits and the tokens chosen: the model's own greedy path, or the one it is made to follow.
 */
async function trace(model, forced) {
  const prompt = model.tokenize(PROMPT);
  const logits = [];
  const tokens = [];
  const g = model._generateExternal(Int32Array.from(prompt), { maxTokens: STEPS, ignoreEos: true });
  g._onLogits = (row) => {
    const copy = Float32Array.from(row);
    const token = forced ? forced[logits.length] : argmax(copy);
    logits.push(copy);
    tokens.push(token);
    model._feed(g.id, token);
  };
  await g.result;
  return { logits, tokens };
}

function argmax(v) {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}

/** The CPU side: runs in a child process with CUDA_VISIBLE_DEVICES='' so no op goes to the GPU. */
async function cpuSide(index, file) {
  const path = await FIXTURES[index].make();
  const model = await loadModel(path, { gpuLayers: 0, contextSize: 256, maxSequences: 1 });
  const { logits, tokens } = await trace(model);
  await model.dispose();
  const flat = new Float32Array(logits.length * logits[0].length);
  logits.forEach((row, i) => flat.set(row, i * row.length));
  writeFileSync(file, Buffer.from(flat.buffer));
  writeFileSync(`${file}.json`, JSON.stringify({ tokens, vocab: logits[0].length }));
}

async function logitsCheck() {
  const results = [];
  // CHECK_FIXTURES=0,2: only those (a rehearsal on a machine without a GPU).
  const picked = process.env.CHECK_FIXTURES ? process.env.CHECK_FIXTURES.split(',').map(Number) : FIXTURES.map((_, i) => i);
  for (const index of picked) {
    const f = FIXTURES[index];
    const path = await f.make(); // generated here first, so the child only reads the cache
    const file = join('/tmp', `genesis-cpu-logits-${index}.f32`);
    const child = spawnSync(process.execPath, [new URL(import.meta.url).pathname, 'cpu-side', String(index), file], {
      stdio: ['ignore', 'inherit', 'inherit'],
      env: { ...process.env, CUDA_VISIBLE_DEVICES: '' },
    });
    if (child.status !== 0) throw new Error(`the CPU run of ${f.name} failed (status ${child.status})`);
    const meta = JSON.parse(readFileSync(`${file}.json`, 'utf8'));
    const cpu = new Float32Array(readFileSync(file).buffer.slice(0));
    const model = await loadModel(path, { gpuLayers: 'max', contextSize: 256, maxSequences: 1 });
    const onGpu = model.info.placement.devices.some((d) => !d.host && d.weights > 0);
    const forcedRun = await trace(model, meta.tokens);
    const own = await trace(model);
    await model.dispose();
    let worstRel = 0;
    let worstAbs = 0;
    let sumRel = 0;
    let choiceAgree = 0;
    const n = meta.vocab;
    forcedRun.logits.forEach((g, step) => {
      const { rel, abs } = distance(g, cpu.subarray(step * n, (step + 1) * n));
      worstAbs = Math.max(worstAbs, abs);
      worstRel = Math.max(worstRel, rel);
      sumRel += rel;
      if (argmax(g) === meta.tokens[step]) choiceAgree++;
    });
    const parted = own.tokens.findIndex((t, i) => t !== meta.tokens[i]);
    let margin;
    if (parted >= 0) {
      const c = Array.from(cpu.subarray(parted * n, (parted + 1) * n)).sort((a, b) => b - a);
      margin = c[0] - c[1];
    }
    const r = {
      fixture: f.name,
      onGpu,
      steps: forcedRun.logits.length,
      meanRelL2: sumRel / forcedRun.logits.length,
      maxRelL2: worstRel,
      maxAbs: worstAbs,
      choicesAgree: choiceAgree,
      greedyIdenticalTokens: parted < 0 ? STEPS : parted,
      cpuTop2MarginWhereParted: margin,
    };
    results.push(r);
    say(
      `logits ${f.name}: ${onGpu ? 'weights on the GPU' : 'NOT ON THE GPU'}; rel L2 mean ${r.meanRelL2.toExponential(2)} max ${r.maxRelL2.toExponential(2)}, ` +
        `max |diff| ${r.maxAbs.toFixed(4)}; same choice ${choiceAgree}/${r.steps}; greedy ` +
        (parted < 0 ? `identical for all ${STEPS} tokens` : `parts at token ${parted} (CPU top-2 margin there ${margin.toFixed(4)})`),
    );
  }
  return results;
}

async function concurrentCheck() {
  const results = [];
  const n = Number(process.env.CHECK_CONCURRENT ?? 32);
  for (const spec of (process.env.CHECK_CONCURRENT_MODELS ?? 'qwen3-30b-a3b:q4_0:4,llama-3-8b:q4_0:4').split(',')) {
    const path = await ensureBenchModel(parseModelSpec(spec, { type: 'q4_0' }));
    const r = await measureDeterminism({ model: path, requests: n, concurrency: n, maxTokens: 64, threads: 8, batchSize: 512, gpuLayers: 999, log: (l) => say(`${spec} ${l}`) });
    for (const m of r.modes) say(`concurrent ${spec}: ${m.mode} mode, ${m.equal}/${m.requests} of ${n} concurrent GPU generations equal their solo run; ${m.tokensPerSecond.toFixed(0)} t/s`);
    results.push({ model: spec, ...r });
  }
  return results;
}

async function memoryCheck() {
  const path = await ensureDefaultModel();
  const free = async () => (await estimateMemory(path, { gpuLayers: 'max', contextSize: 512 })).devices.find((d) => !d.host)?.free ?? 0;
  const cycle = async () => {
    const model = await loadModel(path, { gpuLayers: 'max', contextSize: 512, maxSequences: 4 });
    await model.complete('The quick brown fox', { maxTokens: 4, temperature: 0 });
    await model.dispose();
  };
  // The first cycle creates what CUDA and cuBLAS keep for the process (context, handles, memory
  // pools); a leak is what the next 19 take on top of it.
  const before = await free();
  await cycle();
  const afterFirst = await free();
  for (let i = 1; i < 20; i++) await cycle();
  const after = await free();
  const mib = (b) => b / 2 ** 20;
  const r = { freeBeforeMiB: mib(before), freeAfterFirstMiB: mib(afterFirst), freeAfterMiB: mib(after), firstCycleMiB: mib(before - afterFirst), leakedMiB: mib(afterFirst - after) };
  say(
    `memory: device free ${r.freeBeforeMiB.toFixed(0)} MiB before, ${r.freeAfterFirstMiB.toFixed(0)} after the first load/dispose cycle (kept by CUDA for the process: ${r.firstCycleMiB.toFixed(1)} MiB), ` +
      `${r.freeAfterMiB.toFixed(0)} after 20 (cycles 2-20 took ${r.leakedMiB.toFixed(1)} MiB)`,
  );
  return r;
}

/** Relative L2 distance and largest absolute difference of two logit rows. */
function distance(a, b) {
  let diff2 = 0;
  let ref2 = 0;
  let abs = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i] - b[i];
    diff2 += d * d;
    ref2 += b[i] * b[i];
    abs = Math.max(abs, Math.abs(d));
  }
  return { rel: Math.sqrt(diff2 / ref2), abs };
}

/**
 * A traced run made to follow `ref`'s tokens (`forced`) and left to its own (`own`), against `ref`:
 * the fields each check records.
 */
function compareTraces(ref, forced, own) {
  let maxRel = 0;
  let maxAbs = 0;
  let same = 0;
  forced.logits.forEach((row, step) => {
    const d = distance(row, ref.logits[step]);
    maxRel = Math.max(maxRel, d.rel);
    maxAbs = Math.max(maxAbs, d.abs);
    if (argmax(row) === ref.tokens[step]) same++;
  });
  const parted = own.tokens.findIndex((t, i) => t !== ref.tokens[i]);
  return { steps: forced.logits.length, maxRelL2: maxRel, maxAbs, choicesAgree: same, greedyIdenticalTokens: parted < 0 ? STEPS : parted };
}

const describeTraces = (c) =>
  `rel L2 max ${c.maxRelL2.toExponential(2)}, max |diff| ${c.maxAbs.toFixed(4)}, same choice ${c.choicesAgree}/${c.steps}, greedy ` +
  (c.greedyIdenticalTokens === STEPS ? `identical for all ${STEPS}` : `parts at ${c.greedyIdenticalTokens}`);

const fixture = (name) => FIXTURES.find((f) => f.name.startsWith(name));
const PAGED_FIXTURES = [
  fixture('default'),
  fixture('qwen3moe f16 2L'),
  {
    name: 'deepseek2 q8_0 2L (MLA)',
    make: () =>
      makeSyntheticModel({
        arch: 'deepseek2', vocab: 'qwen2', type: 'q8_0', nLayer: 2, nEmbd: 256, nHead: 4, headDim: 96, nExpert: 16, nExpertUsed: 4, nFfExp: 64,
        mla: { kvLoraRank: 64, qLoraRank: 128 }, expertGroups: { count: 4, used: 2 }, expertWeightsScale: 2.5,
      }),
  },
  {
    name: 'qwen35moe f16 4L (hybrid)',
    make: () => makeSyntheticModel({ arch: 'qwen35moe', vocab: 'qwen2', type: 'f16', nLayer: 4, nEmbd: 256, nHead: 4, nHeadKv: 2, headDim: 64, nFf: 512, nExpert: 16, nExpertUsed: 4, nFfExp: 64 }),
  },
  fixture('qwen3-30b-a3b:q4_0:2'),
  fixture('llama-3-8b:q4_0:2'),
  // quantized KV caches (kvCacheType), gathered as they are stored
  { ...fixture('qwen3-30b-a3b:q4_0:2'), name: 'qwen3-30b-a3b:q4_0:2, q8_0 KV', kvCacheType: 'q8_0' },
  { ...fixture('llama-3-8b:q4_0:2'), name: 'llama-3-8b:q4_0:2, q4_0 KV', kvCacheType: 'q4_0' },
];

async function pagedCheck() {
  const results = [];
  const picked = process.env.CHECK_FIXTURES ? process.env.CHECK_FIXTURES.split(',').map(Number) : PAGED_FIXTURES.map((_, i) => i);
  for (const index of picked) {
    const f = PAGED_FIXTURES[index];
    const gpu = { gpuLayers: 'max', flashAttention: true, ...(f.kvCacheType ? { kvCacheType: f.kvCacheType } : {}) };
    const path = await f.make();
    const r = { fixture: f.name };
    try {
      // One sequence: the standard cache's greedy path, then the paged cache made to follow it.
      const standard = await loadModel(path, { ...gpu, contextSize: 512, maxSequences: 1 });
      const ref = await trace(standard);
      await standard.dispose();
      const paged = await loadModel(path, { ...gpu, contextSize: 512, maxSequences: 1, kvPaged: true });
      r.kvPaged = paged.info.context.kvPaged;
      const forced = await trace(paged, ref.tokens);
      const own = await trace(paged);
      await paged.dispose();
      const c = compareTraces(ref, forced, own);
      Object.assign(r, c);
      // 16 requests at once in a pool that holds about a quarter of what they need, each against its
      // paged solo run (on the GPU, batch composition changes the matrix kernels: counted, not asserted).
      const prompts = Array.from({ length: 16 }, (_, i) => `Request ${i}: ${PROMPT} in the year ${1400 + i * 7}`);
      const greedy = { temperature: 0, ignoreEos: true, maxTokens: 64 };
      const solo = await loadModel(path, { ...gpu, contextSize: 512, maxSequences: 1, kvPaged: true });
      const soloTokens = [];
      for (const p of prompts) soloTokens.push((await solo.complete(p, greedy)).tokens);
      await solo.dispose();
      const pool = await loadModel(path, { ...gpu, contextSize: 512, maxSequences: 16, kvPaged: true, kvBudget: 384 });
      const settled = await Promise.allSettled(prompts.map((p) => pool.complete(p, greedy)));
      const stats = pool.stats();
      await pool.dispose();
      const done = settled.filter((s) => s.status === 'fulfilled');
      const errors = settled.filter((s) => s.status === 'rejected').map((s) => String(s.reason?.message ?? s.reason));
      const equal = done.filter((s, i) => JSON.stringify(s.value.tokens) === JSON.stringify(soloTokens[i])).length;
      const complete = done.filter((s) => s.value.tokens.length === greedy.maxTokens).length;
      Object.assign(r, { pool: { requests: prompts.length, budget: 384, completed: complete, errors, equalToSolo: equal, preemptions: stats.preemptions, leftInPool: stats.kvUsedTokens + stats.active + stats.queued } });
      say(
        `paged ${f.name}: kvPaged ${r.kvPaged}; vs standard cache, ${describeTraces(c)}` +
          `; pool of 384 for 16 requests: ${complete}/16 complete, ${errors.length} errors, ${equal}/16 equal to solo, ${stats.preemptions} preemptions, ${r.pool.leftInPool} left in the pool`,
      );
    } catch (error) {
      r.error = String(error?.stack ?? error);
      say(`paged ${f.name}: FAILED ${r.error}`);
    }
    results.push(r);
  }
  return results;
}

/** Models with expert groups, in expert counts 0009's kernel takes: small, and one real-width layer. */
const ROUTING_FIXTURES = [
  PAGED_FIXTURES.find((f) => f.name.startsWith('deepseek2')),
  {
    name: 'deepseek2 q8_0 3L, 32 experts in 8 groups (test/fixtures DEEPSEEK_GROUPED)',
    make: () =>
      makeSyntheticModel({
        arch: 'deepseek2', vocab: 'qwen2', type: 'q8_0', nLayer: 3, nEmbd: 128, nHead: 2, headDim: 96, nExpert: 32, nExpertUsed: 6, nFfExp: 32,
        mla: { kvLoraRank: 64, qLoraRank: 96 }, expertGroups: { count: 8, used: 3 }, expertWeightsScale: 2.5,
      }),
  },
  { name: 'deepseek-v3:q4_0:1 (real widths)', make: () => ensureBenchModel(parseModelSpec('deepseek-v3:q4_0:1', { type: 'q4_0' })) },
];

async function routingCheck() {
  const results = [];
  for (const f of ROUTING_FIXTURES) {
    const path = await f.make();
    const gpu = { gpuLayers: 'max', contextSize: 512, maxSequences: 1, expertStats: true };
    const r = { fixture: f.name };
    try {
      const counts = async (m) => (await m.expertStats({ reset: true })).layers.map((l) => Array.from(l.counts));
      const chain = await loadModel(path, gpu);
      const ref = await trace(chain);
      const chainCounts = await counts(chain);
      await chain.dispose();
      const fused = await loadModel(path, { ...gpu, fusedMoeRouting: true });
      r.fusedMoeRouting = fused.info.context.fusedMoeRouting;
      const forced = await trace(fused, ref.tokens);
      const fusedCounts = await counts(fused);
      const own = await trace(fused);
      await fused.dispose();
      const c = compareTraces(ref, forced, own);
      const layersCountedAlike = fusedCounts.filter((l, i) => JSON.stringify(l) === JSON.stringify(chainCounts[i])).length;
      Object.assign(r, c, { layersCountedAlike, layers: chainCounts.length });
      say(`routing ${f.name}: fusedMoeRouting ${r.fusedMoeRouting}; vs upstream's chain, ${describeTraces(c)}; expert counts equal in ${layersCountedAlike}/${chainCounts.length} layers`);
    } catch (error) {
      r.error = String(error?.stack ?? error);
      say(`routing ${f.name}: FAILED ${r.error}`);
    }
    results.push(r);
  }
  return results;
}

/** A q4_0 bench model by spec, the GPU when the addon has one, and `n` prompts of `length` random token ids. */
async function benchRun(spec, seed, n, length) {
  const path = await ensureBenchModel(parseModelSpec(spec, { type: 'q4_0' }));
  const device = systemInfo().gpuOffload ? { gpuLayers: 'max' } : { gpuLayers: 0 };
  const next = mulberry32(seed);
  const prompts = Array.from({ length: n }, () => Array.from({ length }, () => 100 + Math.floor(next() * 20000)));
  return { path, device, prompts };
}

async function swapCheck() {
  const spec = process.env.SWAP_MODEL ?? 'llama-3-8b:q4_0:2';
  const { path, device, prompts } = await benchRun(spec, 7, 16, 64);
  const greedy = { temperature: 0, ignoreEos: true, maxTokens: 192 };
  const budget = (16 * (64 + 192)) / 4;
  const results = [];
  // Standard, paged cell by cell, and paged in blocks of 16 (a sequence's cells in runs of whole
  // blocks: fewer, larger copies).
  for (const [kvPaged, kvBlockSize] of [[false, 1], [true, 1], [true, 16]]) {
    const runs = {};
    for (const [mode, kvSwapMemory] of [['recompute', 0], ['swap', 8 * 2 ** 30]]) {
      const m = await loadModel(path, { ...device, contextSize: 512, maxSequences: 16, kvBudget: budget, kvPaged, kvBlockSize, kvSwapMemory, flashAttention: true });
      try {
        await m.complete(prompts[0].slice(0, 8), { ...greedy, maxTokens: 2 });
        const before = m.stats();
        const t0 = performance.now();
        const out = await Promise.all(prompts.map((p) => m.complete(p, greedy)));
        const seconds = (performance.now() - t0) / 1000;
        const s = m.stats();
        runs[mode] = {
          seconds,
          decodedTokens: s.decodedTokens - before.decodedTokens,
          preemptions: s.preemptions - before.preemptions,
          swapIns: s.kvSwapIns - before.kvSwapIns,
          tokens: out.map((r) => r.tokens),
        };
      } finally {
        await m.dispose();
      }
    }
    const same = runs.recompute.tokens.filter((t, i) => JSON.stringify(t) === JSON.stringify(runs.swap.tokens[i])).length;
    const r = { model: spec, kvPaged, kvBlockSize, budget, same, ...Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, { ...v, tokens: undefined }])) };
    const line = (k) => `${k} ${runs[k].seconds.toFixed(2)} s, ${runs[k].decodedTokens} decoded, ${runs[k].preemptions} preemptions, ${runs[k].swapIns} copied back`;
    say(`swap ${spec}${kvPaged ? ' paged' : ''}${kvBlockSize > 1 ? ` in blocks of ${kvBlockSize}` : ''}, pool ${budget} for 16 × (64 + 192): ${line('recompute')}; ${line('swap')}; recompute/swap time ${(runs.recompute.seconds / runs.swap.seconds).toFixed(2)}×; ${same}/16 outputs the same`);
    results.push(r);
  }
  return results;
}

async function placementCheck() {
  const spec = process.env.PLACE_MODEL ?? 'deepseek-v3:q4_0:2';
  const { path, device, prompts } = await benchRun(spec, 11, 8, 32);
  const greedy = { temperature: 0, ignoreEos: true, maxTokens: 64 };
  const common = { ...device, contextSize: 256, maxSequences: 8, flashAttention: true };

  // The counting run: every expert in host memory, the picks counted over the same prompts.
  const counting = await loadModel(path, { ...common, cpuMoeLayers: 1000, expertStats: true });
  await Promise.all(prompts.map((p) => counting.complete(p, greedy)));
  const heat = await counting.expertStats();
  const nExpert = counting.info.experts;
  await counting.dispose();
  const moeLayers = heat.layers.map((l) => l.layer);
  const nLayer = Math.max(...moeLayers) + 1;
  const cpuMoe = Math.ceil(nLayer / 2);
  const moeOnGpu = moeLayers.filter((il) => il >= cpuMoe).length;
  const gpuExperts = Math.floor((nExpert * moeOnGpu) / moeLayers.length);

  const configs = [
    ['all experts on the GPU', {}],
    [`--n-cpu-moe ${cpuMoe}`, { cpuMoeLayers: cpuMoe }],
    [`gpuExperts ${gpuExperts} of ${nExpert}`, { cpuMoeLayers: 1000, gpuExperts, expertHeat: heat, expertStats: true }],
  ];
  const runs = [];
  for (const [name, options] of configs) {
    const m = await loadModel(path, { ...common, ...options });
    try {
      await m.complete(prompts[0].slice(0, 8), { ...greedy, maxTokens: 4 });
      const one = await m.complete(prompts[0], greedy);
      const single = one.timings.tokensPerSecond;
      const t8 = performance.now();
      const out = await Promise.all(prompts.map((p) => m.complete(p, greedy)));
      const batched = (out.length * greedy.maxTokens) / ((performance.now() - t8) / 1000);
      const device = m.info.placement.devices.filter((d) => !d.host).reduce((sum, d) => sum + d.weights, 0);
      let share;
      if (options.gpuExperts) {
        const p = await m.expertPlacement();
        const routed = p.layers.reduce((a, l) => a + l.routed, 0);
        share = routed > 0 ? p.layers.reduce((a, l) => a + l.routedToCopies, 0) / routed : 0;
      }
      runs.push({ name, single, batched, deviceModelBytes: device, share, tokens: [one.tokens, ...out.map((r) => r.tokens)] });
    } finally {
      await m.dispose();
    }
  }
  // Each side runs its own kernels (an expert on the GPU or the CPU, repacked or plain on the CPU),
  // so outputs agree as far as greedy paths over close logits do, not bit for bit.
  const results = runs.map(({ tokens, ...r }) => ({
    model: spec,
    ...r,
    sameAsAllOnGpu: tokens.filter((t, i) => JSON.stringify(t) === JSON.stringify(runs[0].tokens[i])).length,
    outputs: tokens.length,
  }));
  for (const r of results) {
    say(
      `placement ${spec} ${r.name}: ${r.single.toFixed(1)} tok/s alone, ${r.batched.toFixed(1)} tok/s at 8, weights on the GPU ${(r.deviceModelBytes / 2 ** 30).toFixed(2)} GiB` +
        `${r.share !== undefined ? `, copies took ${(100 * r.share).toFixed(1)}% of the picks` : ''}, ${r.sameAsAllOnGpu}/${r.outputs} outputs as all-on-GPU's`,
    );
  }
  say(`placement ${spec}: gpuExperts / --n-cpu-moe decode ${(results[2].single / results[1].single).toFixed(2)}× alone, ${(results[2].batched / results[1].batched).toFixed(2)}× at 8`);
  // Upstream's own --n-cpu-moe at the same memory: llama-bench from the same source, decode alone.
  const threads = String(Math.min(16, availableParallelism()));
  const upstream = {};
  for (const [name, ncmoe] of [['all experts on the GPU', 0], [`--n-cpu-moe ${cpuMoe}`, cpuMoe]]) {
    const args = ['-m', path, '-t', threads, '-ngl', device.gpuLayers === 'max' ? '99' : '0', '-fa', '1', '-ncmoe', String(ncmoe), '-p', '0', '-n', String(greedy.maxTokens), '-r', '2', '-o', 'json'];
    const [row] = parseLlamaBenchJson((await runTool(ensureReferenceTool('llama-bench'), args)).stdout);
    upstream[name] = row.samples.reduce((a, b) => a + b, 0) / row.samples.length;
    say(`placement ${spec} llama-bench ${name}: ${upstream[name].toFixed(1)} tok/s alone`);
  }
  say(`placement ${spec}: gpuExperts / llama-bench --n-cpu-moe ${cpuMoe} decode ${(results[2].single / upstream[`--n-cpu-moe ${cpuMoe}`]).toFixed(2)}× alone`);
  return { runs: results, llamaBench: upstream };
}

const [what = 'all', ...rest] = process.argv.slice(2);
if (what === 'cpu-side') {
  await cpuSide(Number(rest[0]), rest[1]);
} else {
  const info = systemInfo();
  say(`variant ${info.variant}, GPU offload ${info.gpuOffload}, binary ${JSON.stringify(info.binary)}`);
  const report = { date: new Date().toISOString(), steps: STEPS };
  const file = join(OUT, `checks-${what}.json`);
  const save = () => writeFileSync(file, JSON.stringify(report, null, 2));
  const checks = { logits: logitsCheck, concurrent: concurrentCheck, memory: memoryCheck, paged: pagedCheck, routing: routingCheck, swap: swapCheck, placement: placementCheck };
  for (const [name, check] of Object.entries(checks)) {
    if (what !== name && what !== 'all') continue;
    report[name] = await check();
    save();
  }
}
