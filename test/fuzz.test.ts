/**
 * Mutated model files never take the process down: each one loads (and generates), or is refused
 * with a ModelLoadError. Bytes are flipped in the metadata values (not the tokenizer arrays) and
 * in the tensor infos, with a fixed seed. Running this on 600 files found the epsilon/rope checks
 * in src/gguf/hparams.ts; here a smaller sample guards against regressions.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readGguf } from '../src/gguf/index.js';
import { loadModel, ModelLoadError } from '../src/index.js';
import { mulberry32 } from '../src/synthetic/models.js';
import { makeFixtureModel } from './fixtures/models.js';

describe('mutated model files', { timeout: 300_000 }, () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'genesis-fuzz-'));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  for (const arch of ['llama', 'qwen3moe'] as const) {
    it(`${arch}: every mutation loads or gives a ModelLoadError`, async () => {
      const source = await makeFixtureModel({ arch, type: 'q8_0' });
      const bytes = await readFile(source);
      const info = await readGguf(source);
      const header = bytes.subarray(0, info.dataOffset);
      const keys = [...info.metadata.keys()].filter((k) => !k.startsWith('tokenizer.ggml.'));
      const tensorInfos = header.indexOf(Buffer.from('token_embd.weight')) - 8;
      const random = mulberry32(arch === 'llama' ? 11 : 12);
      const outcomes = { loaded: 0, refused: 0 };
      for (let i = 0; i < 20; i++) {
        const mutated = Buffer.from(bytes);
        let at: number;
        if (i % 2 === 0) {
          const key = keys[Math.floor(random() * keys.length)]!;
          at = header.indexOf(Buffer.from(key)) + key.length + Math.floor(random() * 16);
        } else {
          at = tensorInfos + Math.floor(random() * (info.dataOffset - tensorInfos));
        }
        mutated[at] = Math.floor(random() * 256);
        mutated[at + 1] = Math.floor(random() * 256);
        const path = join(dir, `${arch}-${i}.gguf`);
        await writeFile(path, mutated);
        try {
          const model = await loadModel(path, { contextSize: 64, maxSequences: 1, threads: 1 });
          try {
            const r = await model.complete('x', { maxTokens: 2, temperature: 0 });
            expect(r.usage.completionTokens).toBeGreaterThan(0);
          } finally {
            await model.dispose();
          }
          outcomes.loaded++;
        } catch (error) {
          expect(error, `${path}: ${String(error)}`).toBeInstanceOf(ModelLoadError);
          outcomes.refused++;
        }
      }
      expect(outcomes.loaded + outcomes.refused).toBe(20);
      expect(outcomes.refused).toBeGreaterThan(0);
    });
  }
});
