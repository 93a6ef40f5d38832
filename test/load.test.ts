import { rm, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, InvalidOptionError, ModelLoadError } from '../src/index.js';
import { makeCorruptFiles, makeFixtureModel, rewriteMetadata } from './fixtures/models.js';

describe('loading', () => {
  let dir: string;
  let llama: string;
  let moe: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'genesis-load-'));
    llama = await makeFixtureModel({ arch: 'llama', type: 'f16', nLayer: 3 });
    moe = await makeFixtureModel({ arch: 'qwen3moe', type: 'q8_0' });
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reports the dense model shape and the context it was given', async () => {
    const progress: number[] = [];
    const model = await loadModel(llama, { contextSize: 512, maxSequences: 3, threads: 1, onProgress: (p) => progress.push(p) });
    try {
      const info = model.info;
      expect(info.architecture).toBe('llama');
      expect(info.layers).toBe(3);
      expect(info.embeddingLength).toBe(64);
      expect(info.heads).toBe(4);
      expect(info.kvHeads).toBe(2);
      expect(info.vocabSize).toBe(32000);
      expect(info.experts).toBe(0);
      expect(info.fileType).toMatch(/F16/);
      expect(info.context).toMatchObject({ contextSize: 512, maxSequences: 3 });
      expect(info.specialTokens.bos).toBe(1);
      expect(info.metadata['general.architecture']).toBe('llama');
      // Progress is reported, ends at 1, never goes backwards.
      expect(progress.at(-1)).toBe(1);
      expect([...progress].sort((a, b) => a - b)).toEqual(progress);
    } finally {
      await model.dispose();
    }
  });

  it('reports experts of an MoE model', async () => {
    const model = await loadModel(moe, { contextSize: 256, maxSequences: 1, threads: 1 });
    try {
      expect(model.info.architecture).toBe('qwen3moe');
      expect(model.info.experts).toBe(8);
      expect(model.info.expertsUsed).toBe(2);
      expect(model.info.vocabSize).toBe(151936);
      expect(model.info.fileType).toMatch(/Q8_0/);
    } finally {
      await model.dispose();
    }
  });

  it('gives a typed error for every kind of bad model file, and the process carries on', async () => {
    const bad = await makeCorruptFiles(dir);
    const expected: Record<string, string> = {
      missing: 'MODEL_NOT_FOUND',
      directory: 'MODEL_UNREADABLE',
      empty: 'MODEL_NOT_GGUF',
      randomBytes: 'MODEL_NOT_GGUF',
      wrongMagic: 'MODEL_NOT_GGUF',
      badVersion: 'MODEL_CORRUPT',
      truncated: 'MODEL_CORRUPT',
      unsupportedArch: 'MODEL_UNSUPPORTED_ARCH',
    };
    for (const [kind, code] of Object.entries(expected)) {
      const path = (bad as Record<string, string>)[kind]!;
      const error = await loadModel(path, { threads: 1 }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error, kind).toBeInstanceOf(ModelLoadError);
      expect((error as ModelLoadError).code, kind).toBe(code);
      expect((error as ModelLoadError).path, kind).toBe(path);
      expect((error as Error).message, kind).toContain(path);
    }
    // Still alive and able to load a good model.
    const model = await loadModel(llama, { contextSize: 128, maxSequences: 1, threads: 1 });
    const r = await model.complete('ok', { maxTokens: 3, temperature: 0 });
    expect(r.tokens).toHaveLength(3);
    await model.dispose();
  });

  it('refuses hyperparameters llama.cpp would abort the process on', async () => {
    const grouped = await makeFixtureModel({
      arch: 'deepseek2', type: 'q8_0', nLayer: 2, nEmbd: 256, nHead: 4, headDim: 96, nExpert: 16, nExpertUsed: 4, nFfExp: 64,
      mla: { kvLoraRank: 64, qLoraRank: 128 }, expertGroups: { count: 4, used: 2 }, expertWeightsScale: 2.5,
    });
    const hybrid = await makeFixtureModel({ arch: 'qwen35', type: 'f16', nLayer: 4, nEmbd: 64, nHead: 4, nHeadKv: 2, headDim: 16, nFf: 128 });
    const set = (key: string, value: number) => (metadata: Array<{ key: string }>, arch: string) =>
      metadata.map((e) => (e.key === `${arch}.${key}` ? { ...e, value } : e)) as never;
    const cases: Array<[string, string, string, number, RegExp]> = [
      [llama, 'no-layers', 'block_count', 0, /block_count is 0/],
      [llama, 'rope', 'rope.dimension_count', 8, /rope.dimension_count \(8\) must equal the attention head size \(16\)/],
      [moe, 'too-many-used', 'expert_used_count', 9, /expert_used_count \(9\) exceeds qwen3moe.expert_count \(8\)/],
      [moe, 'none-used', 'expert_used_count', 0, /expert_used_count is 0/],
      // Found by fuzzing: ggml asserts eps >= 0 when rms_norm first runs, aborting the process.
      [llama, 'negative-eps', 'attention.layer_norm_rms_epsilon', -1, /layer_norm_rms_epsilon is -1, expected a finite number >= 0/],
      [moe, 'zero-rope-base', 'rope.freq_base', 0, /rope.freq_base is 0, expected a finite number > 0/],
      // Group-limited routing: llama.cpp asserts n_group_used < n_expert_groups in its loader.
      [grouped, 'all-groups-used', 'expert_group_used_count', 4, /expert_group_used_count is 4, expected 1 to 3/],
      [grouped, 'groups-not-dividing', 'expert_group_count', 3, /expert_count \(16\) is not a multiple of deepseek2.expert_group_count \(3\)/],
      // Hybrids: a zero interval divides by zero; one longer than the model leaves no attention layer,
      // and the empty KV cache aborted on first use.
      [hybrid, 'zero-interval', 'full_attention_interval', 0, /full_attention_interval is 0, expected at least 1/],
      [hybrid, 'no-attention', 'full_attention_interval', 8, /qwen35 with 4 layers has no attention layer \(one in every 8/],
      [hybrid, 'no-recurrent', 'full_attention_interval', 1, /qwen35 with 4 layers has no recurrent layer \(full_attention_interval 1 makes every layer attend/],
    ];
    for (const [source, name, key, value, message] of cases) {
      const path = await rewriteMetadata(source, join(dir, `${name}.gguf`), set(key, value));
      const error = await loadModel(path, { threads: 1 }).catch((e: unknown) => e);
      expect(error, name).toBeInstanceOf(ModelLoadError);
      expect((error as ModelLoadError).code, name).toBe('MODEL_CORRUPT');
      expect((error as Error).message, name).toMatch(message);
    }
  });

  it('refuses weights whose digest is not the expected one', async () => {
    const { hashModel } = await import('../src/index.js');
    const { sha256 } = await hashModel(llama);
    const model = await loadModel(llama, { contextSize: 64, maxSequences: 1, threads: 1, expectedSha256: sha256 });
    await model.dispose();
    const wrong = `${sha256.slice(0, 63)}${sha256.endsWith('0') ? '1' : '0'}`;
    const error = await loadModel(llama, { threads: 1, expectedSha256: wrong }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ModelLoadError);
    expect((error as ModelLoadError).code).toBe('MODEL_CORRUPT');
    expect((error as Error).message).toContain(wrong);
    expect((error as Error).message).toContain(sha256);
    const malformed = await loadModel(llama, { expectedSha256: 'abc' }).catch((e: unknown) => e);
    expect((malformed as InvalidOptionError).option).toBe('expectedSha256');
  });

  it('rejects impossible load options with the option named', async () => {
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ contextSize: 0 }, 'contextSize'],
      [{ contextSize: 1.5 }, 'contextSize'],
      [{ maxSequences: 0 }, 'maxSequences'],
      [{ maxSequences: 100000 }, 'maxSequences'],
      [{ batchSize: 2, maxSequences: 4 }, 'batchSize'],
      [{ threads: -1 }, 'threads'],
      [{ gpuLayers: 'all' }, 'gpuLayers'],
      [{ flashAttention: 'yes' }, 'flashAttention'],
      [{ onProgress: 5 }, 'onProgress'],
    ];
    for (const [options, option] of cases) {
      const error = await loadModel(llama, options as never).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error, option).toBeInstanceOf(InvalidOptionError);
      expect((error as InvalidOptionError).option).toBe(option);
      expect((error as Error).message).toContain(option);
    }
    const empty = await loadModel('', {}).catch((e: unknown) => e);
    expect(empty).toBeInstanceOf(InvalidOptionError);
  });

  it('load and dispose 50 times without resident memory growth', async () => {
    // Bound: 64 MiB over 50 cycles after 10 warm-up cycles. Measured: ~30 MiB, flattening out (glibc
    // keeps per-thread arenas of the engine threads; 200 cycles plateau near +55 MiB). A leaked model
    // alone would be its 9 MiB of touched weights per cycle, i.e. > 400 MiB here.
    const cycle = async () => {
      const model = await loadModel(llama, { contextSize: 256, maxSequences: 2, threads: 1 });
      await model.complete('memory', { maxTokens: 2, temperature: 0 });
      await model.dispose();
    };
    for (let i = 0; i < 10; i++) await cycle();
    const before = process.memoryUsage().rss;
    for (let i = 0; i < 50; i++) await cycle();
    const growth = process.memoryUsage().rss - before;
    expect(growth).toBeLessThan(64 * 2 ** 20);
  });
});

describe('worker threads', () => {
  it('loads and generates inside a worker, same tokens as the main thread, alongside a main-thread model', async () => {
    const { Worker } = await import('node:worker_threads');
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const main = await loadModel(path, { contextSize: 128, maxSequences: 1, threads: 1 });
    try {
      const expected = (await main.complete('worker threads', { maxTokens: 8, temperature: 0 })).tokens;
      const source = `
        const { parentPort, workerData } = require('node:worker_threads');
        (async () => {
          // Loader hooks are per thread: register tsx here to import the TypeScript sources.
          (await import('tsx/esm/api')).register();
          const { loadModel } = await import(workerData.entry);
          const model = await loadModel(workerData.path, { contextSize: 128, maxSequences: 1, threads: 1 });
          const r = await model.complete('worker threads', { maxTokens: 8, temperature: 0 });
          await model.dispose();
          parentPort.postMessage(r.tokens);
        })().catch((e) => parentPort.postMessage({ error: String(e) }));`;
      const entry = new URL('../src/index.ts', import.meta.url).href;
      const worker = new Worker(source, { eval: true, workerData: { path, entry } });
      const tokens = await new Promise((resolve, reject) => {
        worker.once('message', resolve);
        worker.once('error', reject);
      });
      await worker.terminate();
      expect(tokens).toEqual(expected);
      // The main thread's model still works after the worker's environment is gone.
      expect((await main.complete('worker threads', { maxTokens: 8, temperature: 0 })).tokens).toEqual(expected);
    } finally {
      await main.dispose();
    }
  });
});
