/**
 * GGUF data model shared by the reader and the writer.
 *
 * Conventions (they matter to every caller):
 * - Tensor shapes are `number[]` in ggml order `[ne0, ne1, ...]`: ne0 is the contiguous
 *   (innermost) dimension, so a PyTorch `[out, in]` weight is `[in, out]` here. Every
 *   dimension is validated to be a safe integer, which holds for any file that fits on a disk.
 * - Offsets and byte sizes are `number` for the same reason (2^53 bytes is 8 PiB).
 * - 64-bit metadata integers stay `bigint` so they survive a copy exactly.
 */

/** GGUF metadata value type ids, as stored in the file (`enum gguf_type` in gguf.h). */
export const GgufValueTypeId = {
  u8: 0,
  i8: 1,
  u16: 2,
  i16: 3,
  u32: 4,
  i32: 5,
  f32: 6,
  bool: 7,
  string: 8,
  array: 9,
  u64: 10,
  i64: 11,
  f64: 12,
} as const;

export type GgufValueTypeName = keyof typeof GgufValueTypeId;
/** Types an array element (or a plain value) may have; llama.cpp rejects arrays of arrays. */
export type GgufScalarTypeName = Exclude<GgufValueTypeName, 'array'>;

const typeNamesById = new Map<number, GgufValueTypeName>(
  Object.entries(GgufValueTypeId).map(([name, id]) => [id, name as GgufValueTypeName]),
);

export function ggufValueTypeName(id: number): GgufValueTypeName | undefined {
  return typeNamesById.get(id);
}

/** Byte size of a fixed-size scalar type; strings are variable (u64 length + bytes). */
export const GGUF_SCALAR_SIZE: Readonly<Record<Exclude<GgufScalarTypeName, 'string'>, number>> = {
  u8: 1,
  i8: 1,
  u16: 2,
  i16: 2,
  u32: 4,
  i32: 4,
  f32: 4,
  bool: 1,
  u64: 8,
  i64: 8,
  f64: 8,
};

/** How each element type is held in memory when it is an array (typed arrays where possible). */
export interface GgufArrayStorage {
  u8: Uint8Array;
  i8: Int8Array;
  u16: Uint16Array;
  i16: Int16Array;
  u32: Uint32Array;
  i32: Int32Array;
  f32: Float32Array;
  bool: boolean[];
  string: string[];
  u64: BigUint64Array;
  i64: BigInt64Array;
  f64: Float64Array;
}

export type GgufNumberTypeName = 'u8' | 'i8' | 'u16' | 'i16' | 'u32' | 'i32' | 'f32' | 'f64';
export type GgufBigIntTypeName = 'u64' | 'i64';

export type GgufScalarValue =
  | { type: GgufNumberTypeName; value: number }
  | { type: GgufBigIntTypeName; value: bigint }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string };

export type GgufArrayValue = {
  [K in GgufScalarTypeName]: { type: 'array'; itemType: K; value: GgufArrayStorage[K] };
}[GgufScalarTypeName];

/**
 * One metadata value together with its GGUF type, so that a value read from one file can be
 * written to another byte-for-byte (llama.cpp checks types strictly: a u32 key stored as i32 fails).
 * Strings are decoded as UTF-8; invalid sequences would be replaced by U+FFFD (no llama.cpp vocab
 * file contains any).
 */
export type GgufMetadataValue = GgufScalarValue | GgufArrayValue;

export interface GgufTensorInfo {
  name: string;
  /** ggml type id (see `GgmlType`). */
  type: number;
  /** ggml order `[ne0, ne1, ...]`, 1 to 4 dimensions, each >= 1. */
  shape: number[];
  /** Offset of the tensor's bytes relative to `GgufFile.dataOffset`. */
  offset: number;
  /** Exact size of the tensor's bytes, without alignment padding. */
  byteSize: number;
}

export interface GgufFile {
  path: string;
  version: number;
  metadata: Map<string, GgufMetadataValue>;
  tensors: GgufTensorInfo[];
  alignment: number;
  /** Absolute file offset where the tensor data section starts. */
  dataOffset: number;
  fileSize: number;
}

/** GGUF magic bytes "GGUF" read as a little-endian u32. */
export const GGUF_MAGIC = 0x46554747;
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** ggml's GGML_MAX_NAME includes the terminating NUL, so names must be shorter than this. */
export const GGML_MAX_NAME = 64;
export const GGML_MAX_DIMS = 4;

/** ggml tensor type ids (`enum ggml_type` in ggml.h). Ids of removed types are absent on purpose. */
export const GgmlType = {
  F32: 0,
  F16: 1,
  Q4_0: 2,
  Q4_1: 3,
  Q5_0: 6,
  Q5_1: 7,
  Q8_0: 8,
  Q8_1: 9,
  Q2_K: 10,
  Q3_K: 11,
  Q4_K: 12,
  Q5_K: 13,
  Q6_K: 14,
  Q8_K: 15,
  IQ2_XXS: 16,
  IQ2_XS: 17,
  IQ3_XXS: 18,
  IQ1_S: 19,
  IQ4_NL: 20,
  IQ3_S: 21,
  IQ2_S: 22,
  IQ4_XS: 23,
  I8: 24,
  I16: 25,
  I32: 26,
  I64: 27,
  F64: 28,
  IQ1_M: 29,
  BF16: 30,
  TQ1_0: 34,
  TQ2_0: 35,
  MXFP4: 39,
  NVFP4: 40,
  Q1_0: 41,
  Q2_0: 42,
} as const;

export type GgmlTypeName = keyof typeof GgmlType;

export interface GgmlTypeInfo {
  id: number;
  name: GgmlTypeName;
  /** Elements per block; ne0 must be a multiple of it. */
  blockSize: number;
  /** Bytes per block. */
  typeSize: number;
}

const QK_K = 256;

// [blockSize, typeSize] from the block structs in ggml/src/ggml-common.h (llama.cpp de3ff815),
// cross-checked against GGML_QUANT_SIZES in gguf-py.
const sizes: Record<GgmlTypeName, readonly [number, number]> = {
  F32: [1, 4],
  F16: [1, 2],
  Q4_0: [32, 2 + 16],
  Q4_1: [32, 2 + 2 + 16],
  Q5_0: [32, 2 + 4 + 16],
  Q5_1: [32, 2 + 2 + 4 + 16],
  Q8_0: [32, 2 + 32],
  Q8_1: [32, 2 + 2 + 32],
  Q2_K: [QK_K, 2 + 2 + QK_K / 16 + QK_K / 4],
  Q3_K: [QK_K, 2 + QK_K / 4 + QK_K / 8 + 12],
  Q4_K: [QK_K, 2 + 2 + 12 + QK_K / 2],
  Q5_K: [QK_K, 2 + 2 + 12 + QK_K / 2 + QK_K / 8],
  Q6_K: [QK_K, 2 + QK_K / 16 + (3 * QK_K) / 4],
  Q8_K: [QK_K, 4 + QK_K + (QK_K / 16) * 2],
  IQ2_XXS: [QK_K, 2 + (QK_K / 8) * 2],
  IQ2_XS: [QK_K, 2 + (QK_K / 8) * 2 + QK_K / 32],
  IQ3_XXS: [QK_K, 2 + 3 * (QK_K / 8)],
  IQ1_S: [QK_K, 2 + QK_K / 8 + QK_K / 16],
  IQ4_NL: [32, 2 + 16],
  IQ3_S: [QK_K, 2 + 13 * (QK_K / 32) + QK_K / 64],
  IQ2_S: [QK_K, 2 + QK_K / 4 + QK_K / 16],
  IQ4_XS: [QK_K, 2 + 2 + QK_K / 64 + QK_K / 2],
  I8: [1, 1],
  I16: [1, 2],
  I32: [1, 4],
  I64: [1, 8],
  F64: [1, 8],
  IQ1_M: [QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32],
  BF16: [1, 2],
  TQ1_0: [QK_K, 2 + QK_K / 64 + (QK_K - (4 * QK_K) / 64) / 5],
  TQ2_0: [QK_K, 2 + QK_K / 4],
  MXFP4: [32, 1 + 16],
  NVFP4: [64, 64 / 16 + 32],
  Q1_0: [128, 2 + 128 / 8],
  Q2_0: [64, 2 + 64 / 4],
};

export const GGML_TYPES: ReadonlyMap<number, GgmlTypeInfo> = new Map(
  (Object.keys(GgmlType) as GgmlTypeName[]).map((name) => {
    const [blockSize, typeSize] = sizes[name];
    return [GgmlType[name], { id: GgmlType[name], name, blockSize, typeSize }];
  }),
);

export function ggmlTypeInfo(type: number): GgmlTypeInfo | undefined {
  return GGML_TYPES.get(type);
}

/**
 * Bytes occupied by a tensor of `type` and `shape` (ggml order). Throws a RangeError when the type
 * is unknown or ne0 is not a whole number of blocks, because ggml cannot represent such a tensor.
 */
export function ggmlTensorByteSize(type: number, shape: readonly number[]): number {
  const info = GGML_TYPES.get(type);
  if (!info) throw new RangeError(`unknown ggml type id ${type}`);
  const ne0 = shape[0] ?? 1;
  if (ne0 % info.blockSize !== 0) {
    throw new RangeError(
      `ggml type ${info.name} needs ne0 to be a multiple of ${info.blockSize}, got shape [${shape.join(', ')}]`,
    );
  }
  let elements = 1;
  for (const d of shape) elements *= d;
  return (elements / info.blockSize) * info.typeSize;
}
