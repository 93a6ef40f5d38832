/**
 * GGUF v3 writer. The header is assembled in memory (it is small: even a 150k-token vocabulary is a
 * few MB), then each tensor is converted and streamed to the file on its own, so peak memory is one
 * tensor, not the model.
 */

import { open } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';

import {
  GGML_MAX_DIMS,
  GGML_MAX_NAME,
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  GGUF_SCALAR_SIZE,
  GgmlType,
  GgufValueTypeId,
  ggmlTensorByteSize,
  ggmlTypeInfo,
} from './types.js';
import type {
  GgufBigIntTypeName,
  GgufNumberTypeName,
  GgufScalarTypeName,
  GgufScalarValue,
} from './types.js';

/** Float values to encode, or bytes already encoded in the tensor's type. */
export type GgufTensorData = Uint8Array | Float32Array;

export interface GgufTensorInput {
  name: string;
  /** ggml type id (`GgmlType.*`) the tensor is stored as. */
  type: number;
  /** ggml order `[ne0, ne1, ...]`, ne0 contiguous. */
  shape: readonly number[];
  /**
   * Float32Array: converted to `type` (F32, F16, Q8_0 and Q4_0 are supported).
   * Uint8Array: already encoded in `type`; must be exactly the tensor's byte size.
   * A function is called only when the tensor is written, so a caller producing many big tensors
   * never holds more than one at a time.
   */
  data: GgufTensorData | (() => GgufTensorData | Promise<GgufTensorData>);
}

/**
 * What the writer accepts as a metadata value: anything the reader returns (so a Map from
 * `readGguf` can be written back unchanged), plus plain arrays for convenience.
 */
export type GgufWritableValue =
  | GgufScalarValue
  | { type: 'array'; itemType: GgufNumberTypeName; value: ArrayLike<number> }
  | { type: 'array'; itemType: GgufBigIntTypeName; value: ArrayLike<bigint> }
  | { type: 'array'; itemType: 'bool'; value: ArrayLike<boolean> }
  | { type: 'array'; itemType: 'string'; value: ArrayLike<string> };

export type GgufMetadataEntry = { key: string } & GgufWritableValue;

export interface GgufWriteInput {
  metadata: Iterable<GgufMetadataEntry> | ReadonlyMap<string, GgufWritableValue>;
  tensors: readonly GgufTensorInput[];
  /**
   * Data alignment. Default: the metadata's `general.alignment` if present, else 32. A value other
   * than 32 is recorded as `general.alignment` (u32), which llama.cpp requires to find the data.
   */
  alignment?: number;
}

const CHUNK = 1 << 20;
const DIRECT_PUSH = 64 * 1024;

/**
 * Encodes little-endian values into 1 MiB chunks and writes them out on flush. Values are written
 * straight into the chunk because a big vocabulary is 300k+ strings and one Buffer per string
 * would dominate the time to write a fixture.
 */
class Sink {
  private parts: Uint8Array[] = [];
  private pending = 0;
  private cur = Buffer.allocUnsafe(CHUNK);
  private len = 0;
  written = 0;

  constructor(private readonly fh: FileHandle) {}

  private seal(): void {
    if (this.len === 0) return;
    this.parts.push(this.cur.subarray(0, this.len));
    this.cur = Buffer.allocUnsafe(CHUNK);
    this.len = 0;
  }

  private reserve(n: number): void {
    if (this.len + n <= this.cur.length) return;
    this.seal();
    if (n > this.cur.length) this.cur = Buffer.allocUnsafe(n);
  }

  private advance(n: number): void {
    this.len += n;
    this.pending += n;
    this.written += n;
  }

  push(b: Uint8Array): void {
    if (b.byteLength >= DIRECT_PUSH) {
      this.seal();
      this.parts.push(b);
      this.pending += b.byteLength;
      this.written += b.byteLength;
      return;
    }
    this.reserve(b.byteLength);
    this.cur.set(b, this.len);
    this.advance(b.byteLength);
  }

  async maybeFlush(): Promise<void> {
    if (this.pending >= CHUNK) await this.flush();
  }

  async flush(): Promise<void> {
    this.seal();
    for (const part of this.parts) {
      let off = 0;
      while (off < part.byteLength) {
        const { bytesWritten } = await this.fh.write(part, off, part.byteLength - off);
        off += bytesWritten;
      }
    }
    this.parts = [];
    this.pending = 0;
  }

  u32(v: number): void {
    this.reserve(4);
    this.cur.writeUInt32LE(v, this.len);
    this.advance(4);
  }
  u64(v: bigint | number): void {
    this.reserve(8);
    this.cur.writeBigUInt64LE(BigInt(v), this.len);
    this.advance(8);
  }
  i64(v: bigint | number): void {
    this.reserve(8);
    this.cur.writeBigInt64LE(BigInt(v), this.len);
    this.advance(8);
  }
  string(s: string): void {
    // A UTF-16 code unit never needs more than 3 UTF-8 bytes, so this bound always suffices.
    this.reserve(8 + s.length * 3);
    const n = this.cur.write(s, this.len + 8, 'utf8');
    this.cur.writeUInt32LE(n % 2 ** 32, this.len);
    this.cur.writeUInt32LE(Math.floor(n / 2 ** 32), this.len + 4);
    this.advance(8 + n);
  }
  zeros(n: number): void {
    if (n <= 0) return;
    this.reserve(n);
    this.cur.fill(0, this.len, this.len + n);
    this.advance(n);
  }
}

/** Writes a GGUF v3 file to `path` (overwriting it). Throws TypeError/RangeError on invalid input. */
export async function writeGguf(path: string, input: GgufWriteInput): Promise<void> {
  const { entries: metadata, alignment } = normaliseMetadata(input.metadata, input.alignment);
  const layout = layoutTensors(input.tensors, alignment);

  const fh = await open(path, 'w');
  try {
    const sink = new Sink(fh);
    sink.u32(GGUF_MAGIC);
    sink.u32(3);
    sink.u64(input.tensors.length);
    sink.u64(metadata.length);
    for (const entry of metadata) {
      sink.string(entry.key);
      writeValue(sink, entry);
      await sink.maybeFlush();
    }
    for (const t of layout) {
      sink.string(t.input.name);
      sink.u32(t.input.shape.length);
      for (const d of t.input.shape) sink.i64(d);
      sink.u32(t.input.type);
      sink.u64(t.offset);
    }
    // Like llama.cpp's reader, only a file with tensors has an aligned data section.
    if (layout.length > 0) sink.zeros(padding(sink.written, alignment));
    await sink.flush();

    for (const t of layout) {
      const raw = typeof t.input.data === 'function' ? await t.input.data() : t.input.data;
      const bytes = encodeTensor(t.input, raw, t.byteSize);
      sink.push(bytes);
      sink.zeros(padding(t.byteSize, alignment));
      await sink.flush();
    }
  } finally {
    await fh.close();
  }
}

function padding(n: number, alignment: number): number {
  return (alignment - (n % alignment)) % alignment;
}

function normaliseMetadata(
  source: GgufWriteInput['metadata'],
  requestedAlignment: number | undefined,
): { entries: GgufMetadataEntry[]; alignment: number } {
  const entries: GgufMetadataEntry[] = [];
  if (isMap(source)) {
    for (const [key, value] of source) entries.push({ key, ...value } as GgufMetadataEntry);
  } else {
    for (const e of source) entries.push(e);
  }
  const seen = new Set<string>();
  for (const e of entries) {
    if (e.key.length === 0) throw new TypeError('metadata keys must not be empty');
    if (seen.has(e.key)) throw new TypeError(`duplicate metadata key '${e.key}'`);
    seen.add(e.key);
  }
  const declared = entries.find((e) => e.key === 'general.alignment');
  if (declared && declared.type !== 'u32') {
    throw new TypeError(`general.alignment must have type u32, got ${declared.type}`);
  }
  const alignment = requestedAlignment ?? (declared?.value as number | undefined) ?? GGUF_DEFAULT_ALIGNMENT;
  if (!Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    throw new RangeError(`alignment must be a power of 2, got ${alignment}`);
  }
  if (declared && declared.value !== alignment) {
    throw new RangeError(`general.alignment in metadata (${String(declared.value)}) disagrees with alignment ${alignment}`);
  }
  if (!declared && alignment !== GGUF_DEFAULT_ALIGNMENT) {
    entries.push({ key: 'general.alignment', type: 'u32', value: alignment });
  }
  return { entries, alignment };
}

function isMap(x: unknown): x is ReadonlyMap<string, GgufWritableValue> {
  return x instanceof Map;
}

function writeValue(sink: Sink, v: GgufMetadataEntry): void {
  if (v.type === 'array') {
    sink.u32(GgufValueTypeId.array);
    sink.u32(GgufValueTypeId[v.itemType]);
    sink.u64(v.value.length);
    if (v.itemType === 'string') {
      for (let i = 0; i < v.value.length; i++) sink.string(v.value[i]!);
    } else if (v.itemType === 'bool') {
      sink.push(Uint8Array.from(v.value, (b) => (b ? 1 : 0)));
    } else {
      sink.push(encodeNumbers(v.key, v.itemType, v.value));
    }
    return;
  }
  sink.u32(GgufValueTypeId[v.type]);
  if (v.type === 'string') sink.string(v.value);
  else if (v.type === 'bool') sink.push(Uint8Array.of(v.value ? 1 : 0));
  else sink.push(encodeNumbers(v.key, v.type, [v.value] as ArrayLike<number> & ArrayLike<bigint>));
}

function encodeNumbers(
  key: string,
  type: Exclude<GgufScalarTypeName, 'string' | 'bool'>,
  values: ArrayLike<number> | ArrayLike<bigint>,
): Buffer {
  const size = GGUF_SCALAR_SIZE[type];
  const b = Buffer.allocUnsafe(values.length * size);
  for (let i = 0; i < values.length; i++) {
    const v = values[i]!;
    const at = i * size;
    try {
      switch (type) {
        case 'u8':
          b.writeUInt8(Number(v), at);
          break;
        case 'i8':
          b.writeInt8(Number(v), at);
          break;
        case 'u16':
          b.writeUInt16LE(Number(v), at);
          break;
        case 'i16':
          b.writeInt16LE(Number(v), at);
          break;
        case 'u32':
          b.writeUInt32LE(Number(v), at);
          break;
        case 'i32':
          b.writeInt32LE(Number(v), at);
          break;
        case 'f32':
          b.writeFloatLE(Number(v), at);
          break;
        case 'f64':
          b.writeDoubleLE(Number(v), at);
          break;
        case 'u64':
          b.writeBigUInt64LE(BigInt(v), at);
          break;
        case 'i64':
          b.writeBigInt64LE(BigInt(v), at);
          break;
      }
    } catch (err) {
      throw new RangeError(`metadata '${key}': value ${String(v)} does not fit type ${type}`, { cause: err });
    }
  }
  return b;
}

interface PlacedTensor {
  input: GgufTensorInput;
  offset: number;
  byteSize: number;
}

function layoutTensors(tensors: readonly GgufTensorInput[], alignment: number): PlacedTensor[] {
  const names = new Set<string>();
  let offset = 0;
  return tensors.map((t) => {
    if (t.name.length === 0 || Buffer.byteLength(t.name) >= GGML_MAX_NAME) {
      throw new RangeError(`tensor name '${t.name}' must be 1 to ${GGML_MAX_NAME - 1} bytes`);
    }
    if (names.has(t.name)) throw new TypeError(`duplicate tensor name '${t.name}'`);
    names.add(t.name);
    if (t.shape.length === 0 || t.shape.length > GGML_MAX_DIMS || !t.shape.every((d) => Number.isSafeInteger(d) && d > 0)) {
      throw new RangeError(`tensor '${t.name}' shape [${t.shape.join(', ')}] must have 1 to 4 positive integer dimensions`);
    }
    if (!ggmlTypeInfo(t.type)) throw new RangeError(`tensor '${t.name}' has unknown ggml type ${t.type}`);
    const byteSize = ggmlTensorByteSize(t.type, t.shape);
    const placed = { input: t, offset, byteSize };
    offset += byteSize + padding(byteSize, alignment);
    return placed;
  });
}

/**
 * Encodes float values as a tensor of type `t.type` (F32, F16, Q8_0, Q4_0) exactly as writeGguf
 * does; for callers that write the same bytes under several tensor names.
 */
export function encodeTensorData(t: Pick<GgufTensorInput, 'name' | 'type' | 'shape'>, data: GgufTensorData): Uint8Array {
  return encodeTensor(t, data, ggmlTensorByteSize(t.type, t.shape));
}

function encodeTensor(t: Pick<GgufTensorInput, 'name' | 'type' | 'shape'>, data: GgufTensorData, byteSize: number): Uint8Array {
  if (data instanceof Uint8Array) {
    if (data.byteLength !== byteSize) {
      throw new RangeError(`tensor '${t.name}' has ${data.byteLength} bytes of data, expected ${byteSize}`);
    }
    return data;
  }
  const elements = t.shape.reduce((a, b) => a * b, 1);
  if (data.length !== elements) {
    throw new RangeError(`tensor '${t.name}' has ${data.length} values, expected ${elements} for shape [${t.shape.join(', ')}]`);
  }
  switch (t.type) {
    case GgmlType.F32:
      return f32Bytes(data);
    case GgmlType.F16: {
      const out = new Uint16Array(data.length);
      for (let i = 0; i < data.length; i++) out[i] = f32ToF16Bits(data[i]!);
      return leBytes(out);
    }
    case GgmlType.Q8_0:
      return quantizeQ8_0(data);
    case GgmlType.Q4_0:
      return quantizeQ4_0(data);
    default:
      throw new RangeError(
        `tensor '${t.name}': cannot convert float data to ggml type ${ggmlTypeInfo(t.type)?.name ?? t.type}; pass encoded bytes`,
      );
  }
}

const littleEndianHost = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function f32Bytes(a: Float32Array): Uint8Array {
  if (littleEndianHost) return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const b = Buffer.allocUnsafe(a.length * 4);
  for (let i = 0; i < a.length; i++) b.writeFloatLE(a[i]!, i * 4);
  return b;
}

function leBytes(a: Uint16Array): Uint8Array {
  if (littleEndianHost) return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const b = Buffer.allocUnsafe(a.length * 2);
  for (let i = 0; i < a.length; i++) b.writeUInt16LE(a[i]!, i * 2);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Float encodings. They mirror ggml bit for bit (ggml-impl.h ggml_compute_fp32_to_fp16 and
// ggml-quants.c quantize_row_*_ref), emulating C float arithmetic with Math.fround after every
// operation: a double result rounded once to float equals the correctly rounded float result for
// +, *, / (53 >= 2*24 + 2), so the emulation is exact.

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

function floatBits(f: number): number {
  f32Scratch[0] = f;
  return u32Scratch[0]!;
}

function floatFromBits(b: number): number {
  u32Scratch[0] = b;
  return f32Scratch[0]!;
}

const SCALE_TO_INF = 2 ** 112;
const SCALE_TO_ZERO = 2 ** -110;

/**
 * IEEE half-precision bits of `f` (first rounded to float32, as C would), rounding to nearest,
 * ties to even; overflow gives infinity, NaN gives 0x7e00 with the sign kept. Node 20 has no
 * Float16Array. The trick: scaling by 2^112 then 2^-110 makes the float unit do the half-precision
 * rounding, including subnormals, without branching on the exponent.
 */
export function f32ToF16Bits(f: number): number {
  const x = Math.fround(f);
  let base = Math.fround(Math.fround(Math.abs(x) * SCALE_TO_INF) * SCALE_TO_ZERO);
  const w = floatBits(x);
  const shl1W = (w * 2) >>> 0;
  const sign = (w & 0x80000000) >>> 0;
  let bias = (shl1W & 0xff000000) >>> 0;
  if (bias < 0x71000000) bias = 0x71000000;
  base = Math.fround(floatFromBits((bias >>> 1) + 0x07800000) + base);
  const bits = floatBits(base);
  const expBits = (bits >>> 13) & 0x7c00;
  const mantissaBits = bits & 0x0fff;
  const nonsign = expBits + mantissaBits;
  return ((sign >>> 16) | (shl1W > 0xff000000 ? 0x7e00 : nonsign)) & 0xffff;
}

/** Value of IEEE half-precision bits (exact: every half is representable as a double). */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x03ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

const QK8_0 = 32;
const QK4_0 = 32;

function checkBlocks(x: Float32Array, qk: number, type: string): number {
  if (x.length % qk !== 0) throw new RangeError(`${type} needs a multiple of ${qk} values, got ${x.length}`);
  return x.length / qk;
}

/** C `roundf`: halves round away from zero (Math.round would send -2.5 to -2). */
function roundf(v: number): number {
  return v < 0 ? -Math.floor(-v + 0.5) : Math.floor(v + 0.5);
}

/** Q8_0 blocks (f16 scale + 32 int8) exactly as ggml's quantize_row_q8_0_ref. */
export function quantizeQ8_0(x: Float32Array): Uint8Array {
  const nb = checkBlocks(x, QK8_0, 'Q8_0');
  const out = new Uint8Array(nb * (2 + QK8_0));
  for (let i = 0; i < nb; i++) {
    const base = i * QK8_0;
    let amax = 0;
    for (let j = 0; j < QK8_0; j++) amax = Math.max(amax, Math.abs(x[base + j]!));
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    const o = i * (2 + QK8_0);
    const h = f32ToF16Bits(d);
    out[o] = h & 0xff;
    out[o + 1] = h >>> 8;
    for (let j = 0; j < QK8_0; j++) {
      out[o + 2 + j] = roundf(Math.fround(x[base + j]! * id)) & 0xff;
    }
  }
  return out;
}

/** Q4_0 blocks (f16 scale + 16 bytes of nibbles) exactly as ggml's quantize_row_q4_0_ref. */
export function quantizeQ4_0(x: Float32Array): Uint8Array {
  const nb = checkBlocks(x, QK4_0, 'Q4_0');
  const out = new Uint8Array(nb * (2 + QK4_0 / 2));
  for (let i = 0; i < nb; i++) {
    const base = i * QK4_0;
    let amax = 0;
    let max = 0;
    for (let j = 0; j < QK4_0; j++) {
      const v = x[base + j]!;
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    // The signed extreme maps to -8 so the full [-8, 7] nibble range is used.
    const d = Math.fround(max / -8);
    const id = d ? Math.fround(1 / d) : 0;
    const o = i * (2 + QK4_0 / 2);
    const h = f32ToF16Bits(d);
    out[o] = h & 0xff;
    out[o + 1] = h >>> 8;
    for (let j = 0; j < QK4_0 / 2; j++) {
      const x0 = Math.fround(x[base + j]! * id);
      const x1 = Math.fround(x[base + QK4_0 / 2 + j]! * id);
      const xi0 = Math.min(15, toInt8(Math.fround(x0 + 8.5))) & 0xff;
      const xi1 = Math.min(15, toInt8(Math.fround(x1 + 8.5))) & 0xff;
      out[o + 2 + j] = (xi0 | (xi1 << 4)) & 0xff;
    }
  }
  return out;
}

/** C `(int8_t)f`: truncate toward zero, then wrap to 8 bits. */
function toInt8(f: number): number {
  return (Math.trunc(f) << 24) >> 24;
}
