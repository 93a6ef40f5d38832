/**
 * Model identity (src/verify/identity.ts): the tensor-data SHA-256 equals what llama.cpp's
 * llama-gguf-hash prints, is cached by file identity, changes with any weight byte, and
 * verifyModelFile refuses a mismatching file with a typed error.
 */
import { spawnSync } from 'node:child_process';
import { copyFile, mkdtemp, open, readFile, rm, stat, utimes } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ModelLoadError } from '../src/index.js';
import { readGguf } from '../src/gguf/index.js';
import { hashCacheFile, hashModel, hashStats, verifyModelFile } from '../src/verify/identity.js';
import { makeFixtureModel, rewriteMetadata } from './fixtures/models.js';

const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;

/** `llama-gguf-hash --sha256 F` → { model digest, tensor name → digest }. */
function referenceHash(tool: string, path: string): { sha256: string; tensors: Map<string, string> } {
  const r = spawnSync(tool, ['--sha256', path], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${tool} failed: ${r.stderr}`);
  const tensors = new Map<string, string>();
  let sha256 = '';
  for (const line of r.stdout.split('\n')) {
    const m = /^sha256\s+([0-9a-f]{64})\s+(.*)$/.exec(line.trim());
    if (!m) continue;
    if (m[2] === path) sha256 = m[1]!;
    else if (m[2]!.startsWith(`${path}:`)) tensors.set(m[2]!.slice(path.length + 1), m[1]!);
  }
  return { sha256, tensors };
}

describe('model identity', () => {
  let dir: string;
  let q8: string;
  let f16: string;
  let tool: string | undefined;
  let toolMissing = '';

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'genesis-identity-'));
    q8 = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    f16 = await makeFixtureModel({ arch: 'qwen3moe', type: 'f16' });
    try {
      const { ensureReferenceTool } = await import('../scripts/llama.mjs');
      const path = ensureReferenceTool('llama-gguf-hash');
      if (existsSync(path)) tool = path;
      else toolMissing = `${path} does not exist`;
    } catch (error) {
      toolMissing = (error as Error).message;
    }
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it('equals llama-gguf-hash --sha256, for the model and per tensor', async (ctx) => {
    if (!tool) {
      console.warn(`skipped: llama-gguf-hash is not available (${toolMissing})`);
      ctx.skip();
      return;
    }
    for (const path of [q8, f16]) {
      const ours = await hashModel(path, { cache: false });
      const ref = referenceHash(tool, path);
      expect(ref.sha256).toMatch(/^[0-9a-f]{64}$/);
      expect(ours.sha256).toBe(ref.sha256);
      expect(ours.tensors.map((t) => t.name)).toEqual([...ref.tensors.keys()]);
      for (const t of ours.tensors) expect(t.sha256, t.name).toBe(ref.tensors.get(t.name));
      console.log(`gguf-hash comparison ${path}: ours ${ours.sha256} = llama-gguf-hash ${ref.sha256} (${ours.tensors.length} tensors)`);
    }
  });

  it('streams with progress and covers exactly the tensor bytes', async () => {
    const seen: number[] = [];
    const before = hashStats.bytesRead;
    const d = await hashModel(q8, { cache: false, onProgress: (p) => seen.push(p) });
    const gguf = await readGguf(q8);
    expect(hashStats.bytesRead - before).toBe(gguf.tensors.reduce((n, t) => n + t.byteSize, 0));
    expect(d.cached).toBe(false);
    expect(d.tensors).toHaveLength(gguf.tensors.length);
    expect(seen.at(-1)).toBe(1);
    for (let i = 1; i < seen.length; i++) expect(seen[i]!).toBeGreaterThanOrEqual(seen[i - 1]!);
  });

  it('is cached by file identity: a second call reads no tensor data; a touched file is re-hashed', async () => {
    const cacheDir = join(dir, 'cache');
    const copy = join(dir, 'cached.gguf');
    await copyFile(q8, copy);
    const first = await hashModel(copy, { cacheDir });
    expect(first.cached).toBe(false);
    const entry = JSON.parse(await readFile(await hashCacheFile(copy, cacheDir), 'utf8'));
    expect(entry.sha256).toBe(first.sha256);
    expect(entry.identity.size).toBe((await stat(copy)).size);

    const read = hashStats.bytesRead;
    const hashed = hashStats.filesHashed;
    const second = await hashModel(copy, { cacheDir });
    expect(second).toEqual({ ...first, cached: true });
    expect(hashStats.bytesRead).toBe(read);
    expect(hashStats.filesHashed).toBe(hashed);

    const later = new Date(Date.now() + 5000);
    await utimes(copy, later, later);
    const third = await hashModel(copy, { cacheDir });
    expect(third.cached).toBe(false);
    expect(third.sha256).toBe(first.sha256);
  });

  it('one altered tensor byte changes the digest (and only that tensor\'s); verifyModelFile refuses it', async () => {
    const original = await hashModel(q8, { cache: false });
    const gguf = await readGguf(q8);
    const victim = gguf.tensors[Math.floor(gguf.tensors.length / 2)]!;
    const altered = join(dir, 'altered.gguf');
    await copyFile(q8, altered);
    const at = gguf.dataOffset + victim.offset + Math.floor(victim.byteSize / 2);
    const fh = await open(altered, 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, at);
    b[0] = b[0]! ^ 0x01;
    await fh.write(b, 0, 1, at);
    await fh.close();

    const changed = await hashModel(altered, { cache: false });
    expect(changed.sha256).not.toBe(original.sha256);
    const differing = changed.tensors.filter((t, i) => t.sha256 !== original.tensors[i]!.sha256).map((t) => t.name);
    expect(differing).toEqual([victim.name]);

    await expect(verifyModelFile(q8, original.sha256, { cache: false })).resolves.toMatchObject({ sha256: original.sha256 });
    await expect(verifyModelFile(q8, `SHA256:${original.sha256.toUpperCase()}`, { cache: false })).resolves.toBeTruthy();
    const error = await verifyModelFile(altered, original.sha256, { cache: false }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ModelLoadError);
    expect((error as ModelLoadError).code).toBe('MODEL_CORRUPT');
    expect((error as Error).message).toContain(original.sha256);
    expect((error as Error).message).toContain(changed.sha256);
    const bad = await verifyModelFile(q8, 'not-a-digest').catch((e: unknown) => e);
    expect((bad as ModelLoadError).code).toBe('MODEL_CORRUPT');
  });

  it('metadata is not part of the identity; a missing file is a typed error', async () => {
    const renamed = await rewriteMetadata(q8, join(dir, 'renamed.gguf'), (metadata) =>
      metadata.map((e) => (e.key === 'general.name' ? ({ ...e, value: 'another name' } as typeof e) : e)),
    );
    expect((await hashModel(renamed, { cache: false })).sha256).toBe((await hashModel(q8, { cache: false })).sha256);
    const missing = await hashModel(join(dir, 'nope.gguf')).catch((e: unknown) => e);
    expect((missing as ModelLoadError).code).toBe('MODEL_NOT_FOUND');
  });

  it('genesis hash prints the digest (and --tensors the manifest) in llama-gguf-hash\'s layout', async () => {
    const d = await hashModel(q8, { cache: false });
    const run = (...args: string[]) =>
      spawnSync(process.execPath, ['--import', 'tsx', cli, 'hash', ...args], {
        encoding: 'utf8',
        timeout: 60_000,
        env: { ...process.env, GENESIS_CACHE_DIR: join(dir, 'cli-cache') },
      });
    const r = run(q8);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe(`sha256    ${d.sha256}  ${q8}\n`);
    const t = run(q8, '--tensors');
    expect(t.status, t.stderr).toBe(0);
    const lines = t.stdout.trim().split('\n');
    expect(lines).toHaveLength(d.tensors.length + 1);
    expect(lines[0]).toBe(`sha256    ${d.tensors[0]!.sha256}  ${q8}:${d.tensors[0]!.name}`);
    const j = run(q8, '--json');
    expect(JSON.parse(j.stdout)).toEqual({ sha256: d.sha256, cached: true });
  });
});
