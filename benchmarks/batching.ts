/**
 * Aggregate throughput of the batching engine against llama.cpp's llama-batched-bench, built from
 * the same source, on the same GGUF with the same threads, batch and context, in the same run.
 *
 *   npx tsx benchmarks/batching.ts [--model M] [--pp 32] [--tg 64] [--npl 1,2,4,8,16] [--threads N] [--repeat 3]
 *
 * For each concurrency B: B requests with distinct PP-token prompts each generate TG tokens (greedy,
 * end-of-generation ignored). Throughput S = B*(PP+TG) / wall time, as llama-batched-bench reports
 * it. Each side runs --repeat times, interleaved, and keeps its best figure per B (this machine is
 * shared: the best run is the one least disturbed). Prints a table with the ratio ours / llama.cpp
 * and writes JSON to benchmarks/out/.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, hostname } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ensureReferenceTool, LLAMA_COMMIT } from '../scripts/llama.mjs';
import { loadModel, systemInfo } from '../src/index.js';
import { ensureDefaultModel } from '../src/synthetic/default-model.js';
import { mulberry32 } from '../src/synthetic/models.js';

const { values } = parseArgs({
  options: {
    model: { type: 'string' },
    pp: { type: 'string', default: '32' },
    tg: { type: 'string', default: '64' },
    npl: { type: 'string', default: '1,2,4,8,16' },
    threads: { type: 'string', default: String(availableParallelism()) },
    batch: { type: 'string', default: '512' },
    repeat: { type: 'string', default: '3' },
  },
});
const pp = Number(values.pp);
const tg = Number(values.tg);
const npl = values.npl.split(',').map(Number);
const threads = Number(values.threads);
const batch = Number(values.batch);
const maxB = Math.max(...npl);
const contextSize = pp + tg + 1;

const log = (message: string) => process.stderr.write(`[bench] ${message}\n`);
const modelPath = values.model ?? (await ensureDefaultModel({ onProgress: log }));

interface Row {
  B: number;
  ours: number;
  reference: number | undefined;
}

function runReference(): Map<number, number> {
  const tool = ensureReferenceTool('llama-batched-bench');
  log(`reference: ${tool} (npl ${npl.join(',')})`);
  const r = spawnSync(
    tool,
    ['-m', modelPath, '-c', String(contextSize * maxB), '-b', String(batch), '-ub', String(batch), '-t', String(threads),
      '-npp', String(pp), '-ntg', String(tg), '-npl', npl.join(','), '-ngl', '0'],
    { encoding: 'utf8' },
  );
  if (r.status !== 0) throw new Error(`llama-batched-bench failed (${r.status}): ${r.stderr.slice(-2000)}`);
  const out = new Map<number, number>();
  // |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
  for (const line of (r.stdout + r.stderr).split('\n')) {
    const cells = line.split('|').map((c) => c.trim()).filter(Boolean);
    if (cells.length === 10 && /^\d+$/.test(cells[0]!)) out.set(Number(cells[2]), Number(cells[9]));
  }
  return out;
}

async function runOurs(): Promise<Map<number, number>> {
  const model = await loadModel(modelPath, { contextSize, maxSequences: maxB, batchSize: batch, threads, gpuLayers: 0 });
  const out = new Map<number, number>();
  try {
    const random = mulberry32(7);
    const prompt = () => Array.from({ length: pp }, () => 1 + Math.floor(random() * (model.info.vocabSize - 1)));
    // Warm-up: first decode allocates compute buffers.
    await model.complete(prompt(), { maxTokens: 4, temperature: 0, ignoreEos: true });
    for (const B of npl) {
      const prompts = Array.from({ length: B }, prompt);
      const started = performance.now();
      await Promise.all(prompts.map((p) => model.complete(p, { maxTokens: tg, temperature: 0, ignoreEos: true })));
      const seconds = (performance.now() - started) / 1000;
      out.set(B, (B * (pp + tg)) / seconds);
      log(`ours B=${B}: ${out.get(B)!.toFixed(1)} t/s`);
    }
  } finally {
    await model.dispose();
  }
  return out;
}

const best = (into: Map<number, number>, from: Map<number, number>) => {
  for (const [B, v] of from) into.set(B, Math.max(into.get(B) ?? 0, v));
};
const reference = new Map<number, number>();
const ours = new Map<number, number>();
for (let i = 0; i < Number(values.repeat); i++) {
  log(`round ${i + 1}/${values.repeat}`);
  best(reference, runReference());
  best(ours, await runOurs());
}
const rows: Row[] = npl.map((B) => ({ B, ours: ours.get(B)!, reference: reference.get(B) }));

const device = `${cpus()[0]?.model ?? 'cpu'} x${availableParallelism()} (${systemInfo().variant})`;
console.log(`\nmodel ${modelPath}\ndevice ${device}, threads ${threads}, PP ${pp}, TG ${tg}, batch ${batch}\n`);
console.log('|   B | genesis S t/s | llama-batched-bench S t/s | ratio |');
console.log('|----:|--------------:|--------------------------:|------:|');
for (const r of rows) {
  const ratio = r.reference ? (r.ours / r.reference).toFixed(2) : '-';
  console.log(`| ${String(r.B).padStart(3)} | ${r.ours.toFixed(1).padStart(13)} | ${(r.reference?.toFixed(1) ?? '-').padStart(25)} | ${ratio.padStart(5)} |`);
}
const outDir = join(import.meta.dirname, 'out');
mkdirSync(outDir, { recursive: true });
const file = join(outDir, `batching-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
writeFileSync(
  file,
  JSON.stringify({ date: new Date().toISOString(), host: hostname(), device, llamaCommit: LLAMA_COMMIT, model: modelPath, pp, tg, threads, batch, repeat: Number(values.repeat), rows }, null, 2),
);
console.log(`\nwrote ${file}`);
