/**
 * Batch invariance, measured: N greedy requests each run alone (the reference), then all N at once
 * under concurrent load, in the default mode and in deterministic mode; how many concurrent outputs
 * equal their solo run token for token, and what the deterministic mode costs in throughput.
 */
import { loadModel } from '../model.js';
import { mulberry32 } from '../synthetic/models.js';
import { randomPrompt } from './worker.js';

export interface DeterminismOptions {
  model: string;
  requests: number;
  concurrency: number;
  maxTokens: number;
  threads: number;
  batchSize: number;
  gpuLayers: number;
  seed?: number;
  log?: (line: string) => void;
}

export interface DeterminismMode {
  mode: 'default' | 'deterministic';
  equal: number;
  requests: number;
  /** Generated tokens of all N concurrent requests over their wall time. */
  tokensPerSecond: number;
}

export interface DeterminismResult {
  model: string;
  requests: number;
  concurrency: number;
  maxTokens: number;
  modes: DeterminismMode[];
}

export async function measureDeterminism(o: DeterminismOptions): Promise<DeterminismResult> {
  const random = mulberry32(o.seed ?? 11);
  const base = { contextSize: 64 + o.maxTokens + 1, maxSequences: o.concurrency, threads: o.threads, batchSize: o.batchSize, gpuLayers: o.gpuLayers };
  let prompts: number[][] = [];
  let solo: number[][] = [];
  const modes: DeterminismMode[] = [];
  for (const mode of ['default', 'deterministic'] as const) {
    const model = await loadModel(o.model, { ...base, deterministic: mode === 'deterministic' });
    try {
      const gen = (p: number[]) => model.complete(p, { maxTokens: o.maxTokens, temperature: 0, ignoreEos: true });
      if (solo.length === 0) {
        prompts = Array.from({ length: o.requests }, () => randomPrompt(random, model.info.vocabSize, 8 + Math.floor(random() * 56)));
        o.log?.(`solo runs: ${o.requests} requests one at a time (the reference)`);
        for (const p of prompts) solo.push((await gen(p)).tokens);
      }
      o.log?.(`${mode}: ${o.requests} requests at once, ${o.concurrency} sequences`);
      const started = performance.now();
      const results = await Promise.all(prompts.map(gen));
      const seconds = (performance.now() - started) / 1000;
      const equal = results.filter((r, i) => r.tokens.length === solo[i]!.length && r.tokens.every((t, j) => t === solo[i]![j])).length;
      const tokens = results.reduce((n, r) => n + r.usage.completionTokens, 0);
      modes.push({ mode, equal, requests: o.requests, tokensPerSecond: tokens / seconds });
    } finally {
      await model.dispose();
    }
  }
  return { model: o.model, requests: o.requests, concurrency: o.concurrency, maxTokens: o.maxTokens, modes };
}
