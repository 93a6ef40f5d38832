import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ensureReferenceTool } from '../scripts/llama.mjs';
import { describeModel, MODEL_PRESETS, parseModelSpec, specLabel } from '../src/bench/models.js';
import { batchedBench, parseBatchedBenchJsonl, parseLlamaBenchJson } from '../src/bench/reference.js';
import { expectedExperts, roofline, weightBytesPerStep } from '../src/bench/roofline.js';
import type { BenchReport } from '../src/bench/types.js';
import { readGguf } from '../src/gguf/index.js';
import { loadModel } from '../src/index.js';
import { DEEPSEEK_GROUPED, makeFixtureModel } from './fixtures/models.js';

describe('benchmark model specs', () => {
  it('parses preset[:type[:layers]] with defaults', () => {
    expect(parseModelSpec('qwen3-30b-a3b', { type: 'q4_0' })).toEqual({ preset: 'qwen3-30b-a3b', type: 'q4_0' });
    expect(parseModelSpec('llama-3-8b:f16:3', { type: 'q4_0', layers: 1 })).toEqual({ preset: 'llama-3-8b', type: 'f16', layers: 3 });
    expect(parseModelSpec('llama-3-8b:q8_0', { type: 'q4_0', layers: 2 })).toEqual({ preset: 'llama-3-8b', type: 'q8_0', layers: 2 });
    expect(specLabel({ preset: 'qwen3-30b-a3b', type: 'q4_0' })).toBe('qwen3-30b-a3b:q4_0:48L');
  });

  it('names what is wrong in a bad spec', () => {
    expect(() => parseModelSpec('gpt-5', { type: 'q4_0' })).toThrow(/unknown benchmark model 'gpt-5'.*qwen3-30b-a3b/);
    expect(() => parseModelSpec('llama-3-8b:q3_k', { type: 'q4_0' })).toThrow(/unknown weight type 'q3_k'/);
    expect(() => parseModelSpec('llama-3-8b:q4_0:33', { type: 'q4_0' })).toThrow(/from 1 to 32/);
    expect(() => parseModelSpec('llama-3-8b:q4_0:x', { type: 'q4_0' })).toThrow(/layer count/);
  });

  it('keeps the real shapes the benchmark issue names', () => {
    const q = MODEL_PRESETS['qwen3-30b-a3b'].options;
    expect([q.nEmbd, q.nExpert, q.nExpertUsed, q.nFfExp, q.nHead, q.nHeadKv, q.headDim]).toEqual([2048, 128, 8, 768, 32, 4, 128]);
    const l = MODEL_PRESETS['llama-3-8b'].options;
    expect([l.nEmbd, l.nFf, l.nHead, l.nHeadKv, l.headDim]).toEqual([4096, 14336, 32, 8, 128]);
    const x = MODEL_PRESETS['qwen35-397b-a17b'];
    expect([x.realLayers, x.options.arch, x.options.nEmbd, x.options.nExpert, x.options.nExpertUsed, x.options.nFfExp, x.options.nHead, x.options.nHeadKv, x.options.headDim])
      .toEqual([60, 'qwen35moe', 4096, 512, 10, 1024, 32, 2, 256]);
  });
});

describe('shared layer weights', () => {
  it('gives every layer the bytes of layer 0 and still loads and generates', async () => {
    const options = { arch: 'qwen3moe', nLayer: 3, nEmbd: 64, nHead: 2, headDim: 64, nFfExp: 32, type: 'q8_0', shareLayerWeights: true } as const;
    const path = await makeFixtureModel(options);
    const gguf = await readGguf(path);
    const bytes = readFileSync(path);
    const digest = (name: string) => {
      const t = gguf.tensors.find((x) => x.name === name)!;
      const start = gguf.dataOffset + t.offset;
      return createHash('sha256').update(bytes.subarray(start, start + t.byteSize)).digest('hex');
    };
    for (const suffix of ['attn_q.weight', 'ffn_up_exps.weight', 'ffn_gate_inp.weight']) {
      expect(digest(`blk.2.${suffix}`)).toBe(digest(`blk.0.${suffix}`));
    }
    expect(digest('blk.0.attn_q.weight')).not.toBe(digest('blk.0.attn_k.weight'));
    // head dim 64 with 2 heads of a 64-wide model: q projects 64 → 128.
    expect(gguf.tensors.find((t) => t.name === 'blk.0.attn_q.weight')!.shape).toEqual([64, 128]);
    const shape = await describeModel(path, 'test');
    expect(shape).toMatchObject({ arch: 'qwen3moe', type: 'q8_0', nLayer: 3, headDim: 64, nExpert: 8, nExpertUsed: 2 });

    const model = await loadModel(path, { contextSize: 64, threads: 1 });
    try {
      const r = await model.complete('shared layers', { maxTokens: 4, temperature: 0, ignoreEos: true });
      expect(r.usage.completionTokens).toBe(4);
    } finally {
      await model.dispose();
    }
  });
});

describe('shared expert weights', () => {
  it('gives every routed expert expert 0’s bytes, in both layers, and still routes, loads and generates', async () => {
    const options = { arch: 'qwen3moe', nLayer: 2, nEmbd: 64, nHead: 2, headDim: 64, nFfExp: 32, type: 'q4_0', shareLayerWeights: true, shareExpertWeights: true } as const;
    const path = await makeFixtureModel(options);
    // A file of its own: the option is part of the cache key.
    expect(path).not.toBe(await makeFixtureModel({ ...options, shareExpertWeights: false }));
    const gguf = await readGguf(path);
    const bytes = readFileSync(path);
    const tensor = (name: string) => {
      const t = gguf.tensors.find((x) => x.name === name)!;
      return bytes.subarray(gguf.dataOffset + t.offset, gguf.dataOffset + t.offset + t.byteSize);
    };
    const slices = (name: string) => {
      const t = tensor(name);
      const nExpert = gguf.tensors.find((x) => x.name === name)!.shape.at(-1)!;
      return Array.from({ length: nExpert }, (_, e) => createHash('sha256').update(t.subarray((e * t.length) / nExpert, ((e + 1) * t.length) / nExpert)).digest('hex'));
    };
    for (const name of ['blk.0.ffn_up_exps.weight', 'blk.1.ffn_down_exps.weight']) {
      const s = slices(name);
      expect(s.length).toBe(8);
      expect(new Set(s).size, name).toBe(1);
    }
    // The router and the attention stay random: different experts per token, different matrices.
    expect(createHash('sha256').update(tensor('blk.0.attn_q.weight')).digest('hex')).not.toBe(createHash('sha256').update(tensor('blk.0.attn_k.weight')).digest('hex'));
    const model = await loadModel(path, { contextSize: 64, threads: 1, expertStats: true });
    try {
      const r = await model.complete('shared experts', { maxTokens: 8, temperature: 0, ignoreEos: true });
      expect(r.usage.completionTokens).toBe(8);
      const used = (await model.expertStats()).layers[0]!.counts.filter((c) => c > 0).length;
      expect(used).toBeGreaterThan(2);
    } finally {
      await model.dispose();
    }
  });
});

describe('roofline', () => {
  it('expects k experts at batch 1 and approaches all of them at large batches', () => {
    expect(expectedExperts(128, 8, 1)).toBeCloseTo(8, 10);
    expect(expectedExperts(128, 8, 2)).toBeCloseTo(128 * (1 - (120 / 128) ** 2), 10);
    expect(expectedExperts(128, 8, 1024)).toBeCloseTo(128, 6);
    expect(expectedExperts(0, 0, 8)).toBe(0);
  });

  it('counts all dense weights, B rows of the embedding, and only the routed share of expert tensors', () => {
    const mk = (name: string, shape: number[], byteSize: number) => ({ name, type: 0, shape, offset: 0, byteSize });
    const dense = {
      metadata: new Map([['general.architecture', { type: 'string' as const, value: 'llama' }]]),
      tensors: [mk('token_embd.weight', [4, 100], 1600), mk('output.weight', [4, 100], 1600), mk('blk.0.attn_q.weight', [4, 4], 64)],
    };
    expect(weightBytesPerStep(dense, 1)).toEqual({ bytes: 16 + 1600 + 64, expertsPerLayer: 0 });
    expect(weightBytesPerStep(dense, 8).bytes).toBe(8 * 16 + 1600 + 64);
    // Tied embeddings: the LM head reads the whole embedding.
    expect(weightBytesPerStep({ ...dense, tensors: [dense.tensors[0]!, dense.tensors[2]!] }, 8).bytes).toBe(1600 + 64);

    const moe = {
      metadata: new Map<string, { type: 'string' | 'u32'; value: string | number }>([
        ['general.architecture', { type: 'string', value: 'qwen3moe' }],
        ['qwen3moe.expert_count', { type: 'u32', value: 4 }],
        ['qwen3moe.expert_used_count', { type: 'u32', value: 2 }],
      ]),
      tensors: [mk('blk.0.ffn_up_exps.weight', [4, 8, 4], 4000), mk('blk.0.ffn_gate_inp.weight', [4, 4], 64)],
    };
    expect(weightBytesPerStep(moe as never, 1)).toEqual({ bytes: 2000 + 64, expertsPerLayer: 2 });
    expect(weightBytesPerStep(moe as never, 2).bytes).toBeCloseTo(1000 * 4 * (1 - 0.25) + 64, 6);

    const rows = roofline(dense, 1e6, [{ concurrency: 1, tokensPerSecond: 300 }]);
    expect(rows[0]!.idealStepsPerSecond).toBeCloseTo(1e6 / 1680, 6);
    expect(rows[0]!.fraction).toBeCloseTo(300 / (1e6 / 1680), 6);
  });
});

describe('reference tool output', () => {
  it('reads llama-bench JSON, keeping every repetition', () => {
    const out = `warming up\n[\n  {"n_prompt": 64, "n_gen": 0, "avg_ts": 10, "samples_ts": [9, 11]},\n  {"n_prompt": 0, "n_gen": 16, "avg_ts": 5, "samples_ts": [5]}\n]\n`;
    expect(parseLlamaBenchJson(out)).toEqual([
      { nPrompt: 64, nGen: 0, samples: [9, 11] },
      { nPrompt: 0, nGen: 16, samples: [5] },
    ]);
    expect(() => parseLlamaBenchJson('error: failed to load model')).toThrow(/no JSON/);
  });

  it('reads llama-batched-bench JSONL', () => {
    const out = [
      'main: n_kv_max = 1024',
      '{"n_kv_max": 1024, "pp": 32, "tg": 16, "pl": 4, "n_kv": 192, "t_pp": 0.08, "speed_pp": 1448.5, "t_tg": 0.25, "speed_tg": 252.6, "t": 0.34, "speed": 561.9}',
      '',
    ].join('\n');
    expect(parseBatchedBenchJsonl(out)).toEqual([{ pp: 32, tg: 16, pl: 4, speedTg: 252.6, speed: 561.9 }]);
  });

  it('asks llama-batched-bench once more for rows its logger lost at exit, and fails when they stay missing', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'genesis-bb-'));
    try {
      // A stand-in that prints only the first B it is asked for (as when the last rows are lost).
      const tool = join(dir, 'batched-bench');
      const script = [
        '#!/bin/sh',
        'while [ "$1" != "-npl" ]; do shift; done',
        'first=$(echo "$2" | cut -d, -f1)',
        'echo "{\\"pp\\": 32, \\"tg\\": 16, \\"pl\\": $first, \\"speed_tg\\": $((first * 100)), \\"speed\\": $((first * 150))}"',
      ];
      writeFileSync(tool, `${script.join('\n')}\n`, { mode: 0o755 });
      const settings = { tool, model: 'm.gguf', threads: 1, batchSize: 64, gpuLayers: 0, pp: 32, tg: 16, contextPerSequence: 49 };
      const rows = await batchedBench({ ...settings, npl: [1, 2] });
      expect(rows.map((r) => [r.pl, r.speedTg])).toEqual([[1, 100], [2, 200]]);
      await expect(batchedBench({ ...settings, npl: [1, 2, 4] })).rejects.toThrow(/printed no result for B=4/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('genesis bench end to end (tiny model, real llama.cpp tools)', () => {
  const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;
  let out: string;

  beforeAll(() => {
    // Built once from the pinned source (minutes on 2 cores the first time; cached afterwards).
    for (const tool of ['llama-bench', 'llama-batched-bench', 'llama-server']) ensureReferenceTool(tool);
    out = mkdtempSync(join(tmpdir(), 'genesis-bench-'));
  }, 1_800_000);
  afterAll(() => rmSync(out, { recursive: true, force: true }));

  it('runs every workload against its reference and writes JSON, markdown and HTML', () => {
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', cli, 'bench', '--quick', '--model', 'tiny:q8_0:2', '--threads', '1', '--repeat', '1', '--concurrency', '1,2', '--pp', '16,32', '--tg', '8', '--out', out],
      { encoding: 'utf8', timeout: 600_000 },
    );
    expect(r.status, r.stderr.slice(-3000)).toBe(0);
    // Progress lines while it runs, the ratio table last.
    expect(r.stderr).toMatch(/\[bench\] \[1\/\d+ 0m\d\ds\] measuring CPU memory bandwidth/);
    expect(r.stdout).toMatch(/\| tiny:q8_0:2L \| tg \| tg8 \|/);
    expect(r.stdout.trim().split('\n').at(-1)).toMatch(/^\| tiny:q8_0:2L \| mixed \|/);

    const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8')) as BenchReport;
    expect(report.llamaCommit).toMatch(/^[0-9a-f]{40}$/);
    expect(report.device.bandwidthBytesPerSecond).toBeGreaterThan(0);
    const run = report.runs[0]!;
    expect(run.shape).toMatchObject({ preset: 'tiny', arch: 'llama', type: 'q8_0', nLayer: 2 });
    expect(run.single.map((s) => `${s.test}${s.tokens}`)).toEqual(['pp16', 'pp32', 'tg8']);
    for (const s of run.single) expect(Math.min(s.ours, s.reference)).toBeGreaterThan(0);
    expect(run.batched.map((b) => b.concurrency)).toEqual([1, 2]);
    for (const b of run.batched) expect(Math.min(b.ours, b.reference, b.oursTotal, b.referenceTotal)).toBeGreaterThan(0);
    expect(run.latency.map((l) => l.concurrency)).toEqual([1, 2]);
    for (const stats of [...run.latency.flatMap((l) => [l.ours, l.reference]), run.sharedPrefix!.ours, run.sharedPrefix!.reference, run.mixed!.ours, run.mixed!.reference]) {
      expect(stats.errors, stats.firstError).toBe(0);
      expect(stats.completed).toBe(stats.requests);
      expect(stats.outputTokensPerSecond).toBeGreaterThan(0);
    }
    // Every request generated exactly its max_tokens (ignore_eos) on both servers.
    expect(run.latency[1]!.ours.requests).toBe(4);
    expect(run.roofline!.map((x) => x.concurrency)).toEqual([1, 2]);
    for (const x of run.roofline!) expect(x.fraction).toBeGreaterThan(0);
    expect(report.ratios.filter((x) => x.target !== undefined).map((x) => x.label)).toEqual(['pp16', 'pp32', 'tg8', 'c=1', 'c=2', 'budget 2048, ctx 1024']);
    // A prefix alone (cold), then cached from that request: both servers answered both (the tiny
    // model's prefill is too short here for the cached one to be reliably faster).
    const pc = run.sharedPrefix!.prefixCache!;
    for (const t of [pc.ours, pc.reference]) expect(Math.min(t.coldMs, t.cachedMs)).toBeGreaterThan(0);
    expect(report.ratios.some((x) => x.workload === 'shared-prefix' && x.label === 'prefix cached')).toBe(true);
    expect(readFileSync(join(out, 'report.md'), 'utf8')).toMatch(/\| server \| cold TTFT \| cached TTFT \| cached \/ cold \|\n\|.*\n\| genesis \| [\d.]+ \| [\d.]+ \| [\d.]+ \|/);
    // One KV budget: llama-server's 2 slots of 1024 against our pool holding many short requests.
    const k = run.kvPool!;
    expect(k.referenceSequences).toBe(2);
    expect(k.oursSequences).toBeGreaterThan(2);
    expect([k.ours.errors, k.reference.errors, k.ours.completed, k.reference.completed]).toEqual([0, 0, 32, 32]);
    // Read from our server's /metrics after its round.
    expect(k.oursPreemptions).toBeGreaterThanOrEqual(0);

    expect(readFileSync(join(out, 'report.md'), 'utf8')).toContain('| tiny:q8_0:2L |');
    expect(readFileSync(join(out, 'report.html'), 'utf8')).toMatch(/<canvas/);
  }, 600_000);

  it('measures expert statistics on against off on a MoE model, with its expert load', () => {
    const dir = join(out, 'experts');
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', cli, 'bench', '--quick', '--model', 'tiny-mtp:q8_0:2', '--workloads', 'experts', '--threads', '1', '--repeat', '1', '--concurrency', '2', '--out', dir,
        // Loads ours with fusedMoeRouting (a model without expert groups routes as before).
        '--fused-moe-routing'],
      { encoding: 'utf8', timeout: 600_000 },
    );
    expect(r.status, r.stderr.slice(-3000)).toBe(0);
    expect(r.stderr).toMatch(/experts, round 1\/1: genesis B=2, expert statistics on/);
    const report = JSON.parse(readFileSync(join(dir, 'report.json'), 'utf8')) as BenchReport;
    const e = report.runs[0]!.experts!;
    expect(e.concurrency).toBe(2);
    expect(Math.min(e.statsOn, e.statsOff)).toBeGreaterThan(0);
    // Both layers route: 8 experts each, 2 per token.
    expect(e.layers.map((l) => l.layer)).toEqual([0, 1]);
    for (const l of e.layers) {
      expect(l.counts).toHaveLength(8);
      expect(l.counts.reduce((a, b) => a + b, 0) % 2).toBe(0);
      expect(l.counts.reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    }
    expect(report.ratios.map((x) => [x.workload, x.referenceTool, x.target])).toEqual([['experts', 'genesis, statistics off', 0.99]]);
    expect(readFileSync(join(dir, 'report.md'), 'utf8')).toMatch(/layer 1 \|[ ·░▒▓█]{8}\|/);
    expect(report.settings.fusedMoeRouting).toBe(true);
    expect(readFileSync(join(dir, 'report.md'), 'utf8')).toContain('ours with fused group-limited MoE routing (--fused-moe-routing)');
  }, 600_000);

  it('measures fused MoE routing on against off on a model with expert groups, and skips one without', async () => {
    const grouped = await makeFixtureModel(DEEPSEEK_GROUPED);
    expect((await describeModel(grouped)).expertGroups).toEqual({ count: 8, used: 3 });
    const dir = join(out, 'routing');
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', cli, 'bench', '--quick', '--model', grouped, '--model', 'tiny:q8_0:2', '--workloads', 'routing', '--threads', '1', '--repeat', '1', '--concurrency', '1,2', '--out', dir],
      { encoding: 'utf8', timeout: 600_000 },
    );
    expect(r.status, r.stderr.slice(-3000)).toBe(0);
    expect(r.stderr).toMatch(/routing, round 1\/1: genesis B=1,2, fused MoE routing on/);
    expect(r.stderr).toMatch(/routing: skipped \(tiny:q8_0:2L has no expert groups\)/);
    const report = JSON.parse(readFileSync(join(dir, 'report.json'), 'utf8')) as BenchReport;
    const [withGroups, without] = report.runs;
    expect(without!.routing).toBeUndefined();
    expect(withGroups!.routing!.rows.map((x) => x.concurrency)).toEqual([1, 2]);
    for (const x of withGroups!.routing!.rows) expect(Math.min(x.fusedOn, x.fusedOff)).toBeGreaterThan(0);
    expect(report.ratios.map((x) => [x.workload, x.label, x.referenceTool])).toEqual([
      ['routing', 'B=1', 'genesis, fused routing off'],
      ['routing', 'B=2', 'genesis, fused routing off'],
    ]);
    expect(readFileSync(join(dir, 'report.md'), 'utf8')).toContain('Fused MoE routing (fusedMoeRouting on vs off)');
  }, 600_000);

  it('rejects unknown presets, workloads and bad lists with usage errors', () => {
    for (const args of [['--model', 'nosuch-model'], ['--workloads', 'single,warp'], ['--concurrency', '1,0'], ['--model', 'llama-3-8b:q4_0:99']]) {
      const r = spawnSync(process.execPath, ['--import', 'tsx', cli, 'bench', ...args], { encoding: 'utf8', timeout: 60_000 });
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr).toMatch(/genesis: .*(nosuch-model|warp|--concurrency|from 1 to 32)/);
    }
  });
});

describe('genesis bench --fusion (tiny models)', () => {
  const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;

  it('measures both members alone, both at the same time and fused, prints the table and writes it into the report', () => {
    const out = mkdtempSync(join(tmpdir(), 'genesis-bench-fusion-'));
    try {
      const r = spawnSync(
        process.execPath,
        ['--import', 'tsx', cli, 'bench', '--fusion', '--model', 'tiny:q8_0:2', '--threads', '1', '--repeat', '1', '--concurrency', '1,2', '--tg', '16', '--out', out],
        { encoding: 'utf8', timeout: 300_000 },
      );
      expect(r.status, r.stderr.slice(-3000)).toBe(0);
      // Progress lines as the other modes print them: 1 preparation + 2 stream counts × 4 variants.
      expect(r.stderr).toMatch(/\[bench\] \[1\/9 0m\d\ds\] preparing tiny:q8_0:2L with seeds 1 \(A\) and 2 \(B\)/);
      expect(r.stderr).toMatch(/\[bench\] \[9\/9 \dm\d\ds\] fused A\+B: 2 streams × 16 tokens/);
      expect(r.stdout).toContain('| streams | A alone t/s | B alone t/s | A and B separately, same time (t/s per model) | fused A+B t/s | overhead (fused / separately) |');
      expect(r.stdout).toMatch(/^\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$/m);
      expect(r.stdout).toMatch(/^\| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$/m);

      const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8')) as BenchReport;
      expect(report.runs).toEqual([]);
      expect(report.settings.concurrency).toEqual([1, 2]);
      const fusion = report.fusion!;
      expect(fusion).toMatchObject({ a: 'tiny:q8_0:2L seed 1', b: 'tiny:q8_0:2L seed 2', weights: [0.5, 0.5], genTokens: 16, threads: 1, offload: [] });
      expect(fusion.rows.map((row) => row.streams)).toEqual([1, 2]);
      for (const row of fusion.rows) {
        expect(Math.min(row.a, row.b, row.separately, row.fused)).toBeGreaterThan(0);
        expect(row.overhead).toBeCloseTo(row.fused / row.separately, 10);
        // Fusion does the decode work of both models plus lockstep and JS sampling: not faster than both apart, noise aside.
        expect(row.overhead).toBeLessThan(1.5);
      }
      const md = readFileSync(join(out, 'report.md'), 'utf8');
      expect(md).toContain('## Logit fusion overhead');
      expect(md).toMatch(/^\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$/m);
      expect(md).not.toContain('## Ratios');
      expect(readFileSync(join(out, 'report.html'), 'utf8')).toContain('Logit fusion overhead');
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }, 300_000);

  it('needs a preset, and runs alone', () => {
    const file = spawnSync(process.execPath, ['--import', 'tsx', cli, 'bench', '--fusion', '--model', 'package.json'], { encoding: 'utf8', timeout: 60_000 });
    expect(file.status, file.stderr).toBe(2);
    expect(file.stderr).toMatch(/--fusion needs a preset --model/);
    const both = spawnSync(process.execPath, ['--import', 'tsx', cli, 'bench', '--fusion', '--speculative'], { encoding: 'utf8', timeout: 60_000 });
    expect(both.status, both.stderr).toBe(2);
    expect(both.stderr).toMatch(/--fusion, --speculative and --determinism are separate runs/);
  });
});
