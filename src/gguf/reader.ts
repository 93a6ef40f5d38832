/**
 * GGUF header reader: magic, version, metadata and tensor infos, never the tensor data.
 *
 * It is the gate in front of llama.cpp, whose loader can abort() the whole process on some
 * malformed inputs, so every field is validated against the file size before it is trusted and
 * every failure is a ModelLoadError whose message names the path, the field and what was expected.
 * Reads go through a 1 MiB window so a 200 GB file costs only its header in memory.
 */

import { open, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';

import { ModelLoadError } from '../errors.js';
import {
  GGML_MAX_DIMS,
  GGML_MAX_NAME,
  GGML_TYPES,
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  GGUF_SCALAR_SIZE,
  ggufValueTypeName,
} from './types.js';
import type {
  GgufArrayValue,
  GgufFile,
  GgufMetadataValue,
  GgufScalarTypeName,
  GgufTensorInfo,
} from './types.js';

const WINDOW = 1 << 20;
// llama.cpp's GGUF_MAX_STRING_LENGTH / GGUF_MAX_ARRAY_ELEMENTS: anything larger it rejects anyway.
const MAX_STRING_LENGTH = 1 << 30;
const MAX_ARRAY_ELEMENTS = 1 << 30;
// Smallest encodings, used to reject counts that cannot possibly fit in the file before looping:
// a metadata entry is key length (8) + type (4) + at least 1 value byte; a tensor info is
// name length (8) + n_dims (4) + type (4) + offset (8).
const MIN_KV_BYTES = 13;
const MIN_TENSOR_INFO_BYTES = 24;
const INT64_MAX = (1n << 63n) - 1n;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

class CorruptError extends Error {}

function corrupt(detail: string): never {
  throw new CorruptError(detail);
}

/** A forward-only cursor over a file handle with a refillable read window. */
class Cursor {
  private buf: Buffer = Buffer.allocUnsafe(WINDOW);
  private bufStart = 0;
  private bufEnd = 0;
  pos = 0;

  constructor(
    private readonly fh: FileHandle,
    readonly fileSize: number,
  ) {}

  get remaining(): number {
    return this.fileSize - this.pos;
  }

  /**
   * Makes bytes [pos, pos + n) readable synchronously. Returns undefined when they already are, so
   * hot loops (151k vocab strings) only pay for an await when the window actually moves.
   */
  ensure(n: number, what: string): Promise<void> | undefined {
    if (this.pos + n <= this.bufEnd && this.pos >= this.bufStart) return undefined;
    if (n > this.remaining) {
      corrupt(
        `truncated while reading ${what}: needed ${n} bytes at offset ${this.pos} but the file ends at ${this.fileSize}`,
      );
    }
    return this.fill(n, what);
  }

  private async fill(n: number, what: string): Promise<void> {
    const want = Math.max(n, Math.min(WINDOW, this.remaining));
    if (want > this.buf.length) this.buf = Buffer.allocUnsafe(want);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await this.fh.read(this.buf, got, want - got, this.pos + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    if (got < n) {
      // The file shrank between stat() and read(); report it like any other truncation.
      corrupt(`truncated while reading ${what}: needed ${n} bytes at offset ${this.pos}, read ${got}`);
    }
    this.bufStart = this.pos;
    this.bufEnd = this.pos + got;
  }

  /** Bytes readable without another fill. */
  get buffered(): number {
    return this.bufEnd - this.pos;
  }

  private take(n: number): number {
    const at = this.pos - this.bufStart;
    this.pos += n;
    return at;
  }

  u8(): number {
    return this.buf.readUInt8(this.take(1));
  }
  i8(): number {
    return this.buf.readInt8(this.take(1));
  }
  u16(): number {
    return this.buf.readUInt16LE(this.take(2));
  }
  i16(): number {
    return this.buf.readInt16LE(this.take(2));
  }
  u32(): number {
    return this.buf.readUInt32LE(this.take(4));
  }
  i32(): number {
    return this.buf.readInt32LE(this.take(4));
  }
  f32(): number {
    return this.buf.readFloatLE(this.take(4));
  }
  f64(): number {
    return this.buf.readDoubleLE(this.take(8));
  }
  u64(): bigint {
    return this.buf.readBigUInt64LE(this.take(8));
  }
  i64(): bigint {
    return this.buf.readBigInt64LE(this.take(8));
  }
  utf8(n: number): string {
    const at = this.take(n);
    return this.buf.toString('utf8', at, at + n);
  }
  peekBytes(n: number): number[] {
    const at = this.pos - this.bufStart;
    return [...this.buf.subarray(at, at + n)];
  }

  async readU32(what: string): Promise<number> {
    const p = this.ensure(4, what);
    if (p) await p;
    return this.u32();
  }
  async readU64(what: string): Promise<bigint> {
    const p = this.ensure(8, what);
    if (p) await p;
    return this.u64();
  }
  async readI64(what: string): Promise<bigint> {
    const p = this.ensure(8, what);
    if (p) await p;
    return this.i64();
  }

  /**
   * The string at the cursor when it lies entirely in the window, else undefined (cursor unmoved).
   * Lets string arrays skip one promise per element, which dominates reading a big vocabulary.
   */
  tryString(): string | undefined {
    if (this.buffered < 8) return undefined;
    const at = this.pos - this.bufStart;
    // Two u32 reads instead of a BigInt: no allocation per vocabulary entry.
    const n = this.buf.readUInt32LE(at);
    if (this.buf.readUInt32LE(at + 4) !== 0 || n > this.buffered - 8) return undefined;
    this.pos += 8 + n;
    return this.buf.toString('utf8', at + 8, at + 8 + n);
  }

  async readString(what: string): Promise<string> {
    const p = this.ensure(8, `the length of ${what}`);
    if (p) await p;
    const len = this.u64();
    if (len > BigInt(this.remaining)) {
      corrupt(`${what} has length ${len} at offset ${this.pos - 8}, which exceeds the ${this.remaining} bytes left in the file`);
    }
    if (len > BigInt(MAX_STRING_LENGTH)) {
      corrupt(`${what} has length ${len}, more than llama.cpp's limit of ${MAX_STRING_LENGTH} bytes`);
    }
    const n = Number(len);
    if (n <= WINDOW) {
      const q = this.ensure(n, what);
      if (q) await q;
      return this.utf8(n);
    }
    // Rare (a huge chat template): read it outside the window.
    const out = Buffer.allocUnsafe(n);
    let got = 0;
    while (got < n) {
      const { bytesRead } = await this.fh.read(out, got, n - got, this.pos + got);
      if (bytesRead === 0) corrupt(`truncated while reading ${what}`);
      got += bytesRead;
    }
    this.pos += n;
    return out.toString('utf8');
  }
}

/**
 * Reads and validates the header of a GGUF file (v2 or v3).
 * Throws ModelLoadError with code MODEL_NOT_FOUND, MODEL_UNREADABLE, MODEL_NOT_GGUF or MODEL_CORRUPT.
 */
export async function readGguf(path: string): Promise<GgufFile> {
  let fileSize: number;
  try {
    const st = await stat(path);
    if (st.isDirectory()) {
      throw new ModelLoadError('MODEL_UNREADABLE', path, `cannot read model ${path}: it is a directory, expected a GGUF file`);
    }
    if (!st.isFile()) {
      throw new ModelLoadError('MODEL_UNREADABLE', path, `cannot read model ${path}: it is not a regular file, expected a GGUF file`);
    }
    fileSize = st.size;
  } catch (err) {
    throw toLoadError(path, err);
  }

  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw toLoadError(path, err);
  }
  try {
    return await parse(new Cursor(fh, fileSize), path);
  } catch (err) {
    if (err instanceof CorruptError) {
      throw new ModelLoadError('MODEL_CORRUPT', path, `corrupt GGUF file ${path}: ${err.message}`);
    }
    throw toLoadError(path, err);
  } finally {
    await fh.close();
  }
}

function toLoadError(path: string, err: unknown): unknown {
  if (err instanceof ModelLoadError) return err;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT' || code === 'ENOTDIR') {
    return new ModelLoadError('MODEL_NOT_FOUND', path, `model file not found: ${path}`, { cause: err });
  }
  if (typeof code === 'string') {
    const reason = code === 'EACCES' || code === 'EPERM' ? 'permission denied' : code === 'EISDIR' ? 'it is a directory' : code;
    return new ModelLoadError('MODEL_UNREADABLE', path, `cannot read model ${path}: ${reason}`, { cause: err });
  }
  return err;
}

function hex(bytes: readonly number[]): string {
  return bytes.map((b) => b.toString(16).padStart(2, '0')).join(' ');
}

async function parse(c: Cursor, path: string): Promise<GgufFile> {
  if (c.fileSize < 4) {
    let found = 'the file is empty (0 bytes)';
    if (c.fileSize > 0) {
      await c.ensure(c.fileSize, 'the magic');
      found = `the file is only ${c.fileSize} bytes long (${hex(c.peekBytes(c.fileSize))})`;
    }
    throw new ModelLoadError('MODEL_NOT_GGUF', path, `${path} is not a GGUF file: expected a GGUF file (magic 'GGUF'), but ${found}`);
  }
  await c.ensure(4, 'the magic');
  const magicBytes = c.peekBytes(4);
  if (c.u32() !== GGUF_MAGIC) {
    throw new ModelLoadError(
      'MODEL_NOT_GGUF',
      path,
      `${path} is not a GGUF file: expected a GGUF file (magic 'GGUF'), found bytes ${hex(magicBytes)}`,
    );
  }

  const version = await c.readU32('the version');
  if (version !== 2 && version !== 3) {
    const hint =
      (version & 0xffff) === 0 ? ' (a byte-swapped value: the file may be big-endian)' : version === 1 ? ' (GGUF v1 is obsolete)' : '';
    corrupt(`version is ${version}${hint}, expected 2 or 3`);
  }

  const nTensorsRaw = await c.readU64('the tensor count');
  const nKvRaw = await c.readU64('the metadata key count');
  const minBytes = nTensorsRaw * BigInt(MIN_TENSOR_INFO_BYTES) + nKvRaw * BigInt(MIN_KV_BYTES);
  if (minBytes > BigInt(c.remaining)) {
    corrupt(
      `header declares ${nTensorsRaw} tensors and ${nKvRaw} metadata keys, which need at least ${minBytes} bytes, ` +
        `but only ${c.remaining} bytes follow the header`,
    );
  }
  const nTensors = Number(nTensorsRaw);
  const nKv = Number(nKvRaw);

  const metadata = new Map<string, GgufMetadataValue>();
  for (let i = 0; i < nKv; i++) {
    const key = await c.readString(`the key of metadata entry ${i}`);
    if (key.length === 0) corrupt(`metadata entry ${i} has an empty key`);
    if (metadata.has(key)) corrupt(`duplicate metadata key '${key}' (entry ${i})`);
    metadata.set(key, await readValue(c, key));
  }

  const alignment = readAlignment(metadata);

  const tensors: GgufTensorInfo[] = [];
  const names = new Set<string>();
  const rawOffsets: bigint[] = [];
  for (let i = 0; i < nTensors; i++) {
    const { info, offset } = await readTensorInfo(c, i, names);
    tensors.push(info);
    rawOffsets.push(offset);
  }

  const headerEnd = c.pos;
  // llama.cpp only pads to the data section when there are tensors.
  const dataOffset = nTensors > 0 ? Math.ceil(headerEnd / alignment) * alignment : headerEnd;
  if (nTensors > 0 && dataOffset > c.fileSize) {
    corrupt(`the tensor data section should start at offset ${dataOffset} but the file is only ${c.fileSize} bytes`);
  }
  validateTensorPlacement(tensors, rawOffsets, alignment, dataOffset, c.fileSize);

  return { path, version, metadata, tensors, alignment, dataOffset, fileSize: c.fileSize };
}

function readAlignment(metadata: Map<string, GgufMetadataValue>): number {
  const entry = metadata.get('general.alignment');
  if (!entry) return GGUF_DEFAULT_ALIGNMENT;
  if (entry.type !== 'u32') corrupt(`general.alignment has type ${entry.type}, expected u32`);
  const a = entry.value;
  if (a === 0 || (a & (a - 1)) !== 0) corrupt(`general.alignment is ${a}, expected a power of 2`);
  return a;
}

async function readValue(c: Cursor, key: string): Promise<GgufMetadataValue> {
  const typeId = await c.readU32(`the type of '${key}'`);
  const type = ggufValueTypeName(typeId);
  if (type === undefined) corrupt(`metadata key '${key}' has unknown value type ${typeId}, expected 0-12`);
  if (type !== 'array') return readScalar(c, key, type);

  const itemId = await c.readU32(`the element type of array '${key}'`);
  const itemType = ggufValueTypeName(itemId);
  if (itemType === undefined || itemType === 'array') {
    corrupt(
      `metadata array '${key}' has element type ${itemType ?? itemId}, expected a scalar type (0-8, 10-12; nested arrays are not supported)`,
    );
  }
  const n = await c.readU64(`the length of array '${key}'`);
  const minItem = itemType === 'string' ? 8 : GGUF_SCALAR_SIZE[itemType];
  if (n * BigInt(minItem) > BigInt(c.remaining)) {
    corrupt(
      `metadata array '${key}' declares ${n} elements of type ${itemType}, needing at least ${n * BigInt(minItem)} bytes, ` +
        `but only ${c.remaining} bytes remain`,
    );
  }
  if (n > BigInt(MAX_ARRAY_ELEMENTS)) {
    corrupt(`metadata array '${key}' declares ${n} elements, more than llama.cpp's limit of ${MAX_ARRAY_ELEMENTS}`);
  }
  return readArray(c, key, itemType, Number(n));
}

async function readScalar(c: Cursor, key: string, type: GgufScalarTypeName): Promise<GgufMetadataValue> {
  const what = `the value of '${key}'`;
  if (type === 'string') return { type, value: await c.readString(what) };
  const p = c.ensure(GGUF_SCALAR_SIZE[type], what);
  if (p) await p;
  switch (type) {
    case 'u8':
      return { type, value: c.u8() };
    case 'i8':
      return { type, value: c.i8() };
    case 'u16':
      return { type, value: c.u16() };
    case 'i16':
      return { type, value: c.i16() };
    case 'u32':
      return { type, value: c.u32() };
    case 'i32':
      return { type, value: c.i32() };
    case 'f32':
      return { type, value: c.f32() };
    case 'f64':
      return { type, value: c.f64() };
    case 'u64':
      return { type, value: c.u64() };
    case 'i64':
      return { type, value: c.i64() };
    case 'bool':
      return { type, value: c.u8() !== 0 };
  }
}

async function readArray(c: Cursor, key: string, itemType: GgufScalarTypeName, n: number): Promise<GgufArrayValue> {
  const what = `array '${key}'`;
  if (itemType === 'string') {
    const value = new Array<string>(n);
    for (let i = 0; i < n; i++) value[i] = c.tryString() ?? (await c.readString(`element ${i} of ${what}`));
    return { type: 'array', itemType, value };
  }
  switch (itemType) {
    case 'u8':
      return { type: 'array', itemType, value: await fill(c, what, new Uint8Array(n), 1, () => c.u8()) };
    case 'i8':
      return { type: 'array', itemType, value: await fill(c, what, new Int8Array(n), 1, () => c.i8()) };
    case 'u16':
      return { type: 'array', itemType, value: await fill(c, what, new Uint16Array(n), 2, () => c.u16()) };
    case 'i16':
      return { type: 'array', itemType, value: await fill(c, what, new Int16Array(n), 2, () => c.i16()) };
    case 'u32':
      return { type: 'array', itemType, value: await fill(c, what, new Uint32Array(n), 4, () => c.u32()) };
    case 'i32':
      return { type: 'array', itemType, value: await fill(c, what, new Int32Array(n), 4, () => c.i32()) };
    case 'f32':
      return { type: 'array', itemType, value: await fill(c, what, new Float32Array(n), 4, () => c.f32()) };
    case 'f64':
      return { type: 'array', itemType, value: await fill(c, what, new Float64Array(n), 8, () => c.f64()) };
    case 'u64':
      return { type: 'array', itemType, value: await fill(c, what, new BigUint64Array(n), 8, () => c.u64()) };
    case 'i64':
      return { type: 'array', itemType, value: await fill(c, what, new BigInt64Array(n), 8, () => c.i64()) };
    case 'bool':
      return { type: 'array', itemType, value: await fill(c, what, new Array<boolean>(n), 1, () => c.u8() !== 0) };
  }
}

/** Fills `out` element by element, refilling the window only between runs of buffered elements. */
async function fill<T, A extends { length: number; [i: number]: T }>(
  c: Cursor,
  what: string,
  out: A,
  size: number,
  next: () => T,
): Promise<A> {
  let i = 0;
  while (i < out.length) {
    const p = c.ensure(size, `element ${i} of ${what}`);
    if (p) await p;
    const end = Math.min(out.length, i + Math.floor(c.buffered / size));
    for (; i < end; i++) out[i] = next();
  }
  return out;
}

async function readTensorInfo(
  c: Cursor,
  index: number,
  names: Set<string>,
): Promise<{ info: GgufTensorInfo; offset: bigint }> {
  const name = await c.readString(`the name of tensor ${index}`);
  const label = `tensor ${index} ('${name}')`;
  const nameBytes = Buffer.byteLength(name, 'utf8');
  if (nameBytes >= GGML_MAX_NAME) {
    corrupt(`${label} has a ${nameBytes}-byte name, expected fewer than ${GGML_MAX_NAME} bytes`);
  }
  if (names.has(name)) corrupt(`duplicate tensor name '${name}' (tensor ${index})`);
  names.add(name);

  const nDims = await c.readU32(`the dimension count of ${label}`);
  if (nDims === 0 || nDims > GGML_MAX_DIMS) corrupt(`${label} has ${nDims} dimensions, expected 1 to ${GGML_MAX_DIMS}`);
  const shape: number[] = [];
  let elements = 1n;
  for (let d = 0; d < nDims; d++) {
    const ne = await c.readI64(`dimension ${d} of ${label}`);
    if (ne <= 0n) corrupt(`${label} dimension ${d} is ${ne}, expected at least 1`);
    if (ne > MAX_SAFE) corrupt(`${label} dimension ${d} is ${ne}, which is implausibly large`);
    elements *= ne;
    if (elements > INT64_MAX) corrupt(`${label} has more than 2^63-1 elements`);
    shape.push(Number(ne));
  }

  const type = await c.readU32(`the type of ${label}`);
  const info = GGML_TYPES.get(type);
  if (!info) corrupt(`${label} has unknown ggml type ${type}, expected one of ${[...GGML_TYPES.keys()].join(', ')}`);
  const ne0 = shape[0] ?? 1;
  if (ne0 % info.blockSize !== 0) {
    corrupt(`${label} of type ${info.name} has ${ne0} elements per row, expected a multiple of the block size ${info.blockSize}`);
  }
  const byteSize = (elements / BigInt(info.blockSize)) * BigInt(info.typeSize);
  if (byteSize > BigInt(c.fileSize)) {
    corrupt(`${label} needs ${byteSize} bytes of data but the whole file is ${c.fileSize} bytes`);
  }

  const offset = await c.readU64(`the data offset of ${label}`);
  return { info: { name, type, shape, offset: 0, byteSize: Number(byteSize) }, offset };
}

function validateTensorPlacement(
  tensors: GgufTensorInfo[],
  rawOffsets: bigint[],
  alignment: number,
  dataOffset: number,
  fileSize: number,
): void {
  const dataSize = BigInt(fileSize - dataOffset);
  tensors.forEach((t, i) => {
    const offset = rawOffsets[i] ?? 0n;
    if (offset % BigInt(alignment) !== 0n) {
      corrupt(`tensor '${t.name}' has data offset ${offset}, expected a multiple of the alignment ${alignment}`);
    }
    if (offset + BigInt(t.byteSize) > dataSize) {
      corrupt(
        `tensor '${t.name}' data spans bytes ${BigInt(dataOffset) + offset}-${BigInt(dataOffset) + offset + BigInt(t.byteSize)} ` +
          `but the file is only ${fileSize} bytes (truncated?)`,
      );
    }
    t.offset = Number(offset);
  });

  const byOffset = [...tensors].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < byOffset.length; i++) {
    const prev = byOffset[i - 1]!;
    const cur = byOffset[i]!;
    if (cur.offset < prev.offset + prev.byteSize) {
      corrupt(
        `tensor '${cur.name}' (offset ${cur.offset}) overlaps tensor '${prev.name}' ` +
          `(offset ${prev.offset}, ${prev.byteSize} bytes)`,
      );
    }
  }

  // llama.cpp requires each tensor to start exactly where the previous one (padded) ends.
  let expected = 0;
  for (const t of tensors) {
    if (t.offset !== expected) {
      corrupt(
        `tensor '${t.name}' has data offset ${t.offset}, expected ${expected} ` +
          `(tensors must be stored contiguously in header order, each padded to ${alignment} bytes)`,
      );
    }
    expected += Math.ceil(t.byteSize / alignment) * alignment;
  }
}
