// Routing-step microbenchmark (issue: MoE routing on CUDA): llama.cpp's op chain for MoE routing
// (build_moe_ffn: softmax/sigmoid, bias, group limit, top-k, weights) against our fused kernel,
// on the GPU, at several batch sizes, for real models' routing shapes. Each call is launched and
// waited for, both ways. Prints a table; writes moe-route.json to $OUT.
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
console.log('| shape | tokens | upstream chain (µs) | fused (µs) | speed-up | same choices |');
console.log('|---|--:|--:|--:|--:|---|');
for (const [name, shape] of Object.entries(MOE_ROUTING_SHAPES)) {
  const random = mulberry32(name.length);
  const p = { ...shape, ...(shape.scoring === 'sigmoid' ? { bias: Float32Array.from({ length: shape.nExpert }, () => (random() - 0.5) / 2.5) } : {}) };
  for (const n of [1, 8, 64, 256]) {
    const x = Float32Array.from({ length: shape.nExpert * n }, () => (random() - 0.5) * 8);
    const chain = moeRoute('graph', x, n, p, { device: gpu ? 'gpu' : 'cpu', iterations });
    const fused = gpu ? moeRoute('fused', x, n, p, { iterations }) : undefined;
    const same = fused ? chain.ids.every((id, i) => id === fused.ids[i]) : undefined;
    const row = { shape: name, tokens: n, device: chain.device, chainUs: chain.secondsPerCall * 1e6, fusedUs: fused ? fused.secondsPerCall * 1e6 : null, same };
    rows.push(row);
    console.log(`| ${name} | ${n} | ${row.chainUs.toFixed(1)} | ${fused ? row.fusedUs.toFixed(1) : '-'} | ${fused ? (row.chainUs / row.fusedUs).toFixed(2) : '-'} | ${same ?? '-'} |`);
  }
}
writeFileSync(join(OUT, 'moe-route.json'), JSON.stringify({ date: new Date().toISOString(), iterations, rows }, null, 2));
