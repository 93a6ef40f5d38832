/**
 * MoE routing (native/moe): the C++ reference against llama.cpp's own op chain (build_moe_ffn's
 * routing, built with the same ggml ops) token for token, on the CPU and, in CUDA builds, on the GPU;
 * the fused CUDA kernel against both; the kernel compiling for Hopper wherever nvcc is.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { InvalidOptionError, MOE_ROUTING_SHAPES, moeRoute, type MoeRoutingParams, type MoeRoutingResult } from '../src/index.js';
import { mulberry32 } from '../src/synthetic/models.js';
import { GPU } from './fixtures/gpu.js';
import { repoRoot } from './fixtures/models.js';

/** Router logits as a real router gives them: a few units wide, different per token. */
function logits(n: number, seed: number): Float32Array {
  const random = mulberry32(seed);
  return Float32Array.from({ length: n }, () => (random() - 0.5) * 8);
}

function shapes(): Array<[string, MoeRoutingParams]> {
  const out: Array<[string, MoeRoutingParams]> = Object.entries(MOE_ROUTING_SHAPES).map(([name, p]) => [name, { ...p }]);
  // DeepSeek-V3 and Kimi-K2 route with a selection bias of about the scores' size.
  for (const [name, p] of out) {
    if (p.scoring === 'sigmoid') p.bias = Float32Array.from(logits(p.nExpert, name.length), (x) => x / 20);
  }
  // An expert count upstream's fused kernel does not take (not a power of two), in groups.
  out.push(['160 experts in 2 groups, softmax', { nExpert: 160, nExpertUsed: 6, nGroups: 2, nGroupUsed: 1 }]);
  return out;
}

function expectSame(a: MoeRoutingResult, b: MoeRoutingResult, tolerance: number): void {
  expect(Array.from(a.ids)).toEqual(Array.from(b.ids));
  for (let i = 0; i < a.weights.length; i++) expect(Math.abs(a.weights[i]! - b.weights[i]!)).toBeLessThanOrEqual(tolerance * Math.max(1, Math.abs(b.weights[i]!)));
}

describe('MoE routing', () => {
  for (const [name, p] of shapes()) {
    it(`${name}: the reference equals llama.cpp's op chain token for token (1, 7 and 64 tokens)`, () => {
      for (const n of [1, 7, 64]) {
        const x = logits(p.nExpert * n, n);
        const reference = moeRoute('reference', x, n, p);
        expect(reference.ids).toHaveLength(n * p.nExpertUsed);
        expectSame(reference, moeRoute('graph', x, n, p), 1e-6);
        // The graph with expert groups chosen by ggml_moe_group_topk (patch 0005): the same experts,
        // in the same order, and the same weights bit for bit.
        const op = moeRoute('graph-op', x, n, p);
        expect(Array.from(op.ids)).toEqual(Array.from(reference.ids));
        expect(Array.from(op.weights)).toEqual(Array.from(moeRoute('graph', x, n, p).weights));
        // Every token's experts are distinct, inside the kept groups, best first.
        for (let t = 0; t < n; t++) {
          const ids = Array.from(reference.ids.subarray(t * p.nExpertUsed, (t + 1) * p.nExpertUsed));
          expect(new Set(ids).size).toBe(ids.length);
          const groups = new Set(ids.map((e) => Math.floor(e / (p.nExpert / (p.nGroups ?? 1)))));
          expect(groups.size).toBeLessThanOrEqual(p.nGroupUsed ?? 1);
        }
        if (p.norm) {
          const sum = reference.weights.subarray(0, p.nExpertUsed).reduce((a, w) => a + w, 0);
          expect(sum).toBeCloseTo(p.scale ?? 1, 5);
        }
      }
    });
  }

  it('group limits change the choice: the single best expert loses when its group is weak', () => {
    const p = { nExpert: 64, nExpertUsed: 4, nGroups: 4, nGroupUsed: 2, scoring: 'sigmoid' as const };
    const x = new Float32Array(64).fill(-4);
    x[0] = 3; // the best expert, alone in group 0: its group scores sigmoid(3) + sigmoid(-4) = 0.97
    x.set([2, 1.99], 16); // group 1: 1.76 (no ties: their order is not defined upstream)
    x.set([1.9, 1.89], 32); // group 2: 1.74
    x[48] = 1.95; // group 3: 0.89
    const grouped = moeRoute('reference', x, 1, p);
    expect(Array.from(grouped.ids)).toEqual([16, 17, 32, 33]);
    expectSame(grouped, moeRoute('graph', x, 1, p), 1e-6);
    expectSame(grouped, moeRoute('graph-op', x, 1, p), 1e-6);
    expect(Array.from(moeRoute('reference', x, 1, { ...p, nGroups: 1, nGroupUsed: 1 }).ids)).toEqual([0, 16, 17, 48]);
  });

  it('times the graph both ways when asked: each call waited for, and queued back to back', () => {
    const p = { nExpert: 64, nExpertUsed: 4, nGroups: 4, nGroupUsed: 2, scoring: 'sigmoid' as const };
    const x = Float32Array.from({ length: 64 * 8 }, (_, i) => Math.sin(i * 1.7) * 3);
    const timed = moeRoute('graph', x, 8, p, { iterations: 5 });
    expect(timed.secondsPerCall).toBeGreaterThan(0);
    expect(timed.secondsPerCallPipelined).toBeGreaterThan(0);
    expectSame(timed, moeRoute('reference', x, 8, p), 1e-6);
    const untimed = moeRoute('graph', x, 8, p);
    expect([untimed.secondsPerCall, untimed.secondsPerCallPipelined]).toEqual([0, 0]);
  });

  it('rejects shapes it cannot route with InvalidOptionError naming the parameter', () => {
    const x = new Float32Array(256);
    const bad = (params: Partial<MoeRoutingParams>, n = 1, values = x) => {
      try {
        moeRoute('reference', values, n, { nExpert: 256, nExpertUsed: 8, ...params });
      } catch (error) {
        expect(error).toBeInstanceOf(InvalidOptionError);
        return (error as InvalidOptionError).option;
      }
      return 'accepted';
    };
    expect(bad({ nGroups: 7 })).toBe('nGroups');
    expect(bad({ nGroups: 8, nGroupUsed: 9 })).toBe('nGroupUsed');
    expect(bad({ nGroups: 64, nGroupUsed: 1 })).toBe('nGroups');
    expect(bad({ nExpertUsed: 0 })).toBe('nExpertUsed');
    expect(bad({ bias: new Float32Array(3) })).toBe('bias');
    expect(bad({}, 2)).toBe('logits');
    expect(bad({ nExpert: 2048 }, 1, new Float32Array(2048))).toBe('nExpert');
    expect(() => moeRoute('nope' as 'graph', x, 1, { nExpert: 256, nExpertUsed: 8 })).toThrow(InvalidOptionError);
  });

  it.skipIf(GPU)('the fused kernel is CUDA code: the CPU build says so', () => {
    expect(() => moeRoute('fused', new Float32Array(256), 1, { nExpert: 256, nExpertUsed: 8 })).toThrow(/CPU build of the addon/);
  });

  describe.skipIf(!GPU)('on the GPU', () => {
    for (const [name, p] of shapes()) {
      it(`${name}: the fused kernel, upstream's chain and the graph with the group op on the GPU equal the reference (1 to 256 tokens), and the kernel counts each pick`, () => {
        for (const n of [1, 8, 64, 256]) {
          const x = logits(p.nExpert * n, 100 + n);
          const reference = moeRoute('reference', x, n, p);
          const fused = moeRoute('fused', x, n, p, { counts: true });
          expectSame(fused, reference, 1e-5);
          expectSame(moeRoute('graph', x, n, p, { device: 'gpu' }), reference, 1e-5);
          // With expert groups, ggml-cuda runs the graph with ggml_moe_group_topk as one fused
          // top-k MoE kernel with the group limit (patch 0009): the same experts, weights to 1e-5.
          if ((p.nGroups ?? 1) > 1) expectSame(moeRoute('graph-op', x, n, p, { device: 'gpu' }), reference, 1e-5);
          const picks = new Uint32Array(p.nExpert);
          for (const id of reference.ids) picks[id]!++;
          expect(Array.from(fused.counts!)).toEqual(Array.from(picks));
        }
      });
    }
  });

  const nvcc = spawnSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' }).stdout.trim();
  it.skipIf(!nvcc)('the kernel compiles for Hopper (sm_90) without spilling registers', { timeout: 120_000 }, () => {
    const build = mkdtempSync(join(tmpdir(), 'genesis-moe-'));
    try {
      const configure = spawnSync('cmake', ['-S', join(repoRoot(), 'native', 'moe'), '-B', build, '-DCMAKE_CUDA_ARCHITECTURES=90', '-DCMAKE_BUILD_TYPE=Release'], { encoding: 'utf8' });
      expect(configure.status, configure.stderr).toBe(0);
      const compile = spawnSync('cmake', ['--build', build], { encoding: 'utf8' });
      expect(compile.status, compile.stdout + compile.stderr).toBe(0);
      const report = compile.stdout + compile.stderr;
      expect(report).toMatch(/for 'sm_90'/);
      expect(report).toMatch(/0 bytes spill stores, 0 bytes spill loads/);
      expect(report).not.toMatch(/[1-9]\d* bytes spill/);
    } finally {
      rmSync(build, { recursive: true, force: true });
    }
  });
});
