// Routing-step microbenchmark (issue: MoE routing on CUDA): llama.cpp's op chain for MoE routing
// (build_moe_ffn: softmax/sigmoid, bias, group limit, top-k, weights) against our fused kernel,
// on the GPU, at several batch sizes, for real models' routing shapes. Timed two ways, both sides
// alike: each call launched and waited for (a launch-and-wait floor of ~20 µs dominates the fused
// kernel), and the calls queued back to back with one wait at the end, as ops run inside a decode
// step. With expert groups, also llama.cpp's graph with the group limit and top-k in one op
// (ggml_moe_group_topk, native/patches/0005: what fusedMoeRouting runs), timed queued like the
// chain; on the GPU, ggml-cuda runs that whole graph as one top-k MoE kernel with the group limit
// (native/patches/0009). Both graphs are built in build_moe_ffn's node order, so upstream's own
// fusion applies to the chain wherever it can. "same" means the same experts in the same order as
// the chain and weights within 1e-5 (relative) of the chain's. Prints a table; writes
// moe-route.json to $OUT.
//   node benchmarks/moe-route.mjs [iterations]        (gpu.sh moe)
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { MOE_ROUTING_SHAPES, moeRoute, systemInfo } from '../dist/index.js';
import { mulberry32 } from '../dist/synthetic/models.js';

const OUT = process.env.OUT ?? join(process.cwd(), 'benchmarks', 'out', 'gpu');
mkdirSync(OUT, { recursive: true });
const iterations = Number(process.argv[2] ?? 200);
const gpu = systemInfo().gpuOffload;
const rows = [];
console.log('| shape | tokens | chain, waited (µs) | fused, waited (µs) | speed-up | chain, queued (µs) | fused, queued (µs) | speed-up | graph with op, queued (µs) | speed-up | same choices |');
console.log('|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|');
for (const [name, shape] of Object.entries(MOE_ROUTING_SHAPES)) {
  const random = mulberry32(name.length);
  const p = { ...shape, ...(shape.scoring === 'sigmoid' ? { bias: Float32Array.from({ length: shape.nExpert }, () => (random() - 0.5) / 2.5) } : {}) };
  for (const n of [1, 8, 64, 256]) {
    const x = Float32Array.from({ length: shape.nExpert * n }, () => (random() - 0.5) * 8);
    const graph = { device: gpu ? 'gpu' : 'cpu', iterations };
    const chain = moeRoute('graph', x, n, p, graph);
    const fused = gpu ? moeRoute('fused', x, n, p, { iterations }) : undefined;
    const op = p.nGroups > 1 ? moeRoute('graph-op', x, n, p, graph) : undefined;
    const close = (r) => chain.weights.every((w, i) => Math.abs(w - r.weights[i]) <= 1e-5 * Math.max(1, Math.abs(w)));
    const same = [fused, op].filter(Boolean).every((r) => chain.ids.every((id, i) => id === r.ids[i]) && close(r));
    const row = {
      shape: name, tokens: n, device: chain.device, same,
      chainUs: chain.secondsPerCall * 1e6, fusedUs: fused ? fused.secondsPerCall * 1e6 : null,
      chainQueuedUs: chain.secondsPerCallPipelined * 1e6, fusedQueuedUs: fused ? fused.secondsPerCallPipelined * 1e6 : null,
      opQueuedUs: op ? op.secondsPerCallPipelined * 1e6 : null,
    };
    rows.push(row);
    const us = (v) => (v === null ? '-' : v.toFixed(1));
    const ratio = (a, b) => (b === null ? '-' : (a / b).toFixed(2));
    console.log(
      `| ${name} | ${n} | ${us(row.chainUs)} | ${us(row.fusedUs)} | ${ratio(row.chainUs, row.fusedUs)} | ` +
        `${us(row.chainQueuedUs)} | ${us(row.fusedQueuedUs)} | ${ratio(row.chainQueuedUs, row.fusedQueuedUs)} | ` +
        `${us(row.opQueuedUs)} | ${ratio(row.chainQueuedUs, row.opQueuedUs)} | ${same} |`,
    );
  }
}
writeFileSync(join(OUT, 'moe-route.json'), JSON.stringify({ date: new Date().toISOString(), iterations, rows }, null, 2));
