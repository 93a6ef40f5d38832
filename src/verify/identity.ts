/**
 * Model identity: SHA-256 over a GGUF's tensor data, by the convention of llama.cpp's gguf-hash
 * (examples/gguf-hash): tensors in the file's tensor-info order, each tensor's exact bytes
 * (ggml_nbytes, no alignment padding) fed to one SHA-256 for the model digest, and each tensor's
 * bytes on their own for the per-tensor digests. Metadata is not part of the digest, so renaming a
 * model or editing its description keeps its identity; changing any weight byte changes it.
 *
 * The file is streamed in fixed-size chunks (never read whole) and results are cached by file
 * identity (real path + size + mtime + inode), so a large model is hashed once.
 */
import { createHash } from 'node:crypto';
import { mkdir, open, readFile, realpath, rename, stat, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ModelLoadError } from '../errors.js';
import { readGguf } from '../gguf/index.js';

export interface TensorDigest {
  name: string;
  sha256: string;
}

export interface ModelDigest {
  /** Hex SHA-256 over all tensor data, in tensor-info order (what `llama-gguf-hash --sha256` prints for the file). */
  sha256: string;
  /** One digest per tensor, in tensor-info order. */
  tensors: TensorDigest[];
  /** True when the result came from the cache and the file's tensor data was not read. */
  cached: boolean;
}

export interface HashModelOptions {
  /** Called with the fraction of tensor bytes hashed, in [0, 1]. */
  onProgress?: (fraction: number) => void;
  /** Directory of the cache files. Default: `hashCacheDir()`. */
  cacheDir?: string;
  /** false: neither read nor write the cache. Default true. */
  cache?: boolean;
}

const CHUNK = 4 * 1024 * 1024;
const CACHE_VERSION = 1;

/** Tensor-data bytes read by hashModel in this process (a cache hit adds nothing). */
export const hashStats = { bytesRead: 0, filesHashed: 0 };

/** `$GENESIS_CACHE_DIR/hashes`, else `$XDG_CACHE_HOME/genesis-runtime/hashes`, else `~/.cache/genesis-runtime/hashes`. */
export function hashCacheDir(): string {
  const root = process.env['GENESIS_CACHE_DIR'] ?? join(process.env['XDG_CACHE_HOME'] ?? join(homedir(), '.cache'), 'genesis-runtime');
  return join(root, 'hashes');
}

interface FileIdentity {
  path: string;
  size: number;
  mtimeMs: number;
  ino: number;
  dev: number;
}

async function fileIdentity(path: string): Promise<FileIdentity> {
  const real = await realpath(path);
  const s = await stat(real, { bigint: false });
  return { path: real, size: s.size, mtimeMs: s.mtimeMs, ino: s.ino, dev: s.dev };
}

/** The cache file that holds (or would hold) the digest of `path` as it is now. */
export async function hashCacheFile(path: string, cacheDir = hashCacheDir()): Promise<string> {
  const id = await fileIdentity(path);
  return cacheFileFor(id, cacheDir);
}

function cacheFileFor(id: FileIdentity, cacheDir: string): string {
  const key = createHash('sha256').update(JSON.stringify([CACHE_VERSION, id.path, id.size, id.mtimeMs, id.ino, id.dev])).digest('hex');
  return join(cacheDir, `${key.slice(0, 32)}.json`);
}

async function readCache(file: string, id: FileIdentity): Promise<ModelDigest | undefined> {
  try {
    const entry = JSON.parse(await readFile(file, 'utf8')) as { version: number; identity: FileIdentity; sha256: string; tensors: TensorDigest[] };
    const same = entry.version === CACHE_VERSION && entry.identity.path === id.path && entry.identity.size === id.size &&
      entry.identity.mtimeMs === id.mtimeMs && entry.identity.ino === id.ino && entry.identity.dev === id.dev;
    if (!same || typeof entry.sha256 !== 'string' || !Array.isArray(entry.tensors)) return undefined;
    return { sha256: entry.sha256, tensors: entry.tensors, cached: true };
  } catch {
    return undefined;
  }
}

async function writeCache(file: string, id: FileIdentity, digest: ModelDigest): Promise<void> {
  try {
    await mkdir(join(file, '..'), { recursive: true });
    const tmp = `${file}.${process.pid}.${Date.now()}.tmp`;
    await writeFile(tmp, JSON.stringify({ version: CACHE_VERSION, identity: id, sha256: digest.sha256, tensors: digest.tensors }));
    await rename(tmp, file); // atomic: concurrent hashers never see half a file
  } catch {
    // A read-only cache directory only costs a re-hash next time.
  }
}

/** Digest of a GGUF model's tensor data (see the module comment), cached by file identity. */
export async function hashModel(path: string, options: HashModelOptions = {}): Promise<ModelDigest> {
  const useCache = options.cache ?? true;
  const cacheDir = options.cacheDir ?? hashCacheDir();
  const gguf = await readGguf(path); // typed errors for missing / corrupt files
  const id = await fileIdentity(path);
  const file = cacheFileFor(id, cacheDir);
  if (useCache) {
    const hit = await readCache(file, id);
    if (hit) {
      options.onProgress?.(1);
      return hit;
    }
  }
  const total = gguf.tensors.reduce((n, t) => n + t.byteSize, 0);
  const whole = createHash('sha256');
  const tensors: TensorDigest[] = [];
  const buffer = Buffer.allocUnsafe(Math.min(CHUNK, Math.max(1, total)));
  let done = 0;
  options.onProgress?.(0);
  const handle = await open(id.path, 'r');
  try {
    for (const t of gguf.tensors) {
      const one = createHash('sha256');
      let position = gguf.dataOffset + t.offset;
      let left = t.byteSize;
      while (left > 0) {
        const want = Math.min(left, buffer.length);
        const { bytesRead } = await handle.read(buffer, 0, want, position);
        if (bytesRead <= 0) throw new ModelLoadError('MODEL_CORRUPT', path, `${path}: tensor '${t.name}' data ends early (the file changed while hashing?)`);
        const view = buffer.subarray(0, bytesRead);
        one.update(view);
        whole.update(view);
        position += bytesRead;
        left -= bytesRead;
        done += bytesRead;
        hashStats.bytesRead += bytesRead;
        if (total > 0) options.onProgress?.(done / total);
      }
      tensors.push({ name: t.name, sha256: one.digest('hex') });
    }
  } finally {
    await handle.close();
  }
  hashStats.filesHashed++;
  options.onProgress?.(1);
  const digest: ModelDigest = { sha256: whole.digest('hex'), tensors, cached: false };
  if (useCache) {
    // The file may have changed while we read it: cache only if its identity still holds.
    const after = await fileIdentity(path).catch(() => undefined);
    if (after && cacheFileFor(after, cacheDir) === file) await writeCache(file, id, digest);
  }
  return digest;
}

/**
 * Refuses a model file whose tensor digest is not `expectedSha256` (hex, case-insensitive; an
 * optional 'sha256:' prefix is accepted): throws ModelLoadError 'MODEL_CORRUPT' naming both digests.
 * Returns the digest when it matches.
 */
export async function verifyModelFile(path: string, expectedSha256: string, options: HashModelOptions = {}): Promise<ModelDigest> {
  const expected = expectedSha256.trim().toLowerCase().replace(/^sha256:/, '');
  if (!/^[0-9a-f]{64}$/.test(expected)) {
    throw new ModelLoadError('MODEL_CORRUPT', path, `expected model digest ${JSON.stringify(expectedSha256)} is not a hex SHA-256`);
  }
  const digest = await hashModel(path, options);
  if (digest.sha256 !== expected) {
    throw new ModelLoadError(
      'MODEL_CORRUPT',
      path,
      `${path}: tensor data digest mismatch: expected sha256 ${expected}, actual sha256 ${digest.sha256} (the weights are not the ones expected)`,
    );
  }
  return digest;
}
