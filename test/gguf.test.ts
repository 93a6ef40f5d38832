import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ModelLoadError } from '../src/errors.js';
import {
  GGML_TYPES,
  GgmlType,
  f16BitsToF32,
  f32ToF16Bits,
  ggmlTensorByteSize,
  quantizeQ4_0,
  quantizeQ8_0,
  readGguf,
  writeGguf,
} from '../src/gguf/index.js';
import type { GgufMetadataEntry, GgufTensorInput } from '../src/gguf/index.js';
import {
  fixtureVocabDir,
  makeCorruptFiles,
  makeFixtureModel,
  sha256File,
  vocabPath,
} from './fixtures/models.js';

let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'genesis-gguf-test-'));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function expectLoadError(promise: Promise<unknown>, code: string, message?: RegExp): Promise<ModelLoadError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ModelLoadError);
  const e = err as ModelLoadError;
  expect(e.code).toBe(code);
  if (message) expect(e.message).toMatch(message);
  return e;
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

describe('metadata round trip', () => {
  const entries: GgufMetadataEntry[] = [
    { key: 'general.architecture', type: 'string', value: 'llama' },
    { key: 't.u8', type: 'u8', value: 255 },
    { key: 't.i8', type: 'i8', value: -128 },
    { key: 't.u16', type: 'u16', value: 65535 },
    { key: 't.i16', type: 'i16', value: -32768 },
    { key: 't.u32', type: 'u32', value: 4294967295 },
    { key: 't.i32', type: 'i32', value: -2147483648 },
    { key: 't.f32', type: 'f32', value: Math.fround(0.1) },
    { key: 't.f64', type: 'f64', value: 0.1 },
    { key: 't.u64', type: 'u64', value: 18446744073709551615n },
    { key: 't.i64', type: 'i64', value: -9223372036854775808n },
    { key: 't.bool.true', type: 'bool', value: true },
    { key: 't.bool.false', type: 'bool', value: false },
    { key: 't.string.unicode', type: 'string', value: 'héllo ▁wörld 🦙 <|im_start|>' },
    { key: 't.string.empty', type: 'string', value: '' },
    { key: 't.arr.u8', type: 'array', itemType: 'u8', value: Uint8Array.of(0, 1, 255) },
    { key: 't.arr.i8', type: 'array', itemType: 'i8', value: Int8Array.of(-128, 0, 127) },
    { key: 't.arr.u16', type: 'array', itemType: 'u16', value: Uint16Array.of(0, 65535) },
    { key: 't.arr.i16', type: 'array', itemType: 'i16', value: Int16Array.of(-32768, 32767) },
    { key: 't.arr.u32', type: 'array', itemType: 'u32', value: Uint32Array.of(7, 4294967295) },
    { key: 't.arr.i32', type: 'array', itemType: 'i32', value: Int32Array.of(1, -1, 3, 6) },
    { key: 't.arr.f32', type: 'array', itemType: 'f32', value: Float32Array.of(-0.5, 1e-30, Infinity) },
    { key: 't.arr.f64', type: 'array', itemType: 'f64', value: Float64Array.of(Math.PI, -0) },
    { key: 't.arr.u64', type: 'array', itemType: 'u64', value: BigUint64Array.of(0n, 2n ** 64n - 1n) },
    { key: 't.arr.i64', type: 'array', itemType: 'i64', value: BigInt64Array.of(-(2n ** 63n), 2n ** 63n - 1n) },
    { key: 't.arr.bool', type: 'array', itemType: 'bool', value: [true, false, true] },
    { key: 't.arr.string', type: 'array', itemType: 'string', value: ['<unk>', '', '▁the', '日本'] },
    { key: 't.arr.empty', type: 'array', itemType: 'i32', value: new Int32Array(0) },
  ];

  it('reads back every value type with its GGUF type and exact value', async () => {
    const path = join(dir, 'metadata.gguf');
    await writeGguf(path, { metadata: entries, tensors: [] });
    const file = await readGguf(path);
    expect(file.version).toBe(3);
    expect(file.tensors).toEqual([]);
    expect([...file.metadata.keys()]).toEqual(entries.map((e) => e.key));
    for (const { key, ...value } of entries) {
      expect(file.metadata.get(key), key).toEqual(value);
    }
    const f32 = file.metadata.get('t.f32');
    expect(f32).toEqual({ type: 'f32', value: 0.10000000149011612 });
    const i32s = file.metadata.get('t.arr.i32');
    expect(i32s?.type === 'array' && i32s.value).toBeInstanceOf(Int32Array);
  });

  it('encodes values little-endian at the offsets the GGUF spec gives', async () => {
    const path = join(dir, 'tiny.gguf');
    await writeGguf(path, { metadata: [{ key: 'a', type: 'u32', value: 0x01020304 }], tensors: [] });
    const bytes = await readFile(path);
    expect(hex(bytes)).toBe(
      '47475546' + // magic "GGUF"
        '03000000' + // version 3
        '0000000000000000' + // n_tensors
        '0100000000000000' + // n_kv
        '0100000000000000' + '61' + // key "a"
        '04000000' + // type u32
        '04030201',
    );
  });

  it('rewrites a file read from disk byte-for-byte (real llama.cpp vocab, v2 and v3)', async () => {
    const vocabs = ['llama-spm', 'qwen2', 'aquila'].map((v) => vocabPath(v)).filter((p) => existsSync(p));
    if (vocabs.length === 0) return void console.warn(`skipped: no vocab files in ${fixtureVocabDir()}`);
    for (const src of vocabs) {
      const file = await readGguf(src);
      const copy = join(dir, 'copy.gguf');
      await writeGguf(copy, { metadata: file.metadata, tensors: [] });
      const [a, b] = [await readFile(src), await readFile(copy)];
      expect(b.length).toBe(a.length);
      // Only the version differs for a v2 source: the writer always emits v3.
      expect(b.subarray(8).equals(a.subarray(8)), src).toBe(true);
    }
  });

  it('rejects invalid writer input', async () => {
    const path = join(dir, 'invalid.gguf');
    await expect(
      writeGguf(path, { metadata: [{ key: 'a', type: 'u8', value: 1 }, { key: 'a', type: 'u8', value: 2 }], tensors: [] }),
    ).rejects.toThrow(/duplicate metadata key 'a'/);
    await expect(writeGguf(path, { metadata: [{ key: 'x', type: 'u8', value: 256 }], tensors: [] })).rejects.toThrow(
      /does not fit type u8/,
    );
    await expect(
      writeGguf(path, {
        metadata: [],
        tensors: [{ name: 'w', type: GgmlType.Q8_0, shape: [16, 2], data: new Float32Array(32) }],
      }),
    ).rejects.toThrow(/multiple of 32/);
    await expect(
      writeGguf(path, { metadata: [], tensors: [{ name: 'w', type: GgmlType.F32, shape: [4], data: new Float32Array(3) }] }),
    ).rejects.toThrow(/3 values, expected 4/);
  });
});

describe('tensor layout', () => {
  const q4kBytes = Uint8Array.from({ length: 144 }, (_, i) => i);
  const tensors: GgufTensorInput[] = [
    { name: 'a.f32', type: GgmlType.F32, shape: [3, 2], data: Float32Array.of(1, 2, 3, 4, 5, 6) },
    { name: 'b.f16', type: GgmlType.F16, shape: [5], data: () => Float32Array.of(1, -2, 0.5, 65504, 0) },
    { name: 'c.q8_0', type: GgmlType.Q8_0, shape: [64, 2], data: new Float32Array(128).fill(0.25) },
    { name: 'd.q4_0', type: GgmlType.Q4_0, shape: [32, 1, 3], data: new Float32Array(96).fill(-1) },
    { name: 'e.q4_k.raw', type: GgmlType.Q4_K, shape: [256], data: q4kBytes },
    { name: 'f.i32', type: GgmlType.I32, shape: [2, 2, 2, 2], data: new Uint8Array(64).fill(7) },
  ];

  it('places tensors contiguously with padding and reports exact byte sizes', async () => {
    const path = join(dir, 'tensors.gguf');
    await writeGguf(path, { metadata: [{ key: 'general.name', type: 'string', value: 't' }], tensors, alignment: 64 });
    const file = await readGguf(path);
    expect(file.alignment).toBe(64);
    expect(file.metadata.get('general.alignment')).toEqual({ type: 'u32', value: 64 });
    expect(file.dataOffset % 64).toBe(0);
    expect(file.tensors).toEqual([
      { name: 'a.f32', type: 0, shape: [3, 2], offset: 0, byteSize: 24 },
      { name: 'b.f16', type: 1, shape: [5], offset: 64, byteSize: 10 },
      { name: 'c.q8_0', type: 8, shape: [64, 2], offset: 128, byteSize: 136 },
      { name: 'd.q4_0', type: 2, shape: [32, 1, 3], offset: 320, byteSize: 54 },
      { name: 'e.q4_k.raw', type: 12, shape: [256], offset: 384, byteSize: 144 },
      { name: 'f.i32', type: 26, shape: [2, 2, 2, 2], offset: 576, byteSize: 64 },
    ]);
    // The last tensor is padded too, as gguf-py does.
    expect(file.fileSize).toBe(file.dataOffset + 640);

    const bytes = await readFile(path);
    const at = (name: string): Buffer => {
      const t = file.tensors.find((x) => x.name === name)!;
      return bytes.subarray(file.dataOffset + t.offset, file.dataOffset + t.offset + t.byteSize);
    };
    expect([...new Float32Array(Uint8Array.from(at('a.f32')).buffer)]).toEqual([1, 2, 3, 4, 5, 6]);
    expect(hex(at('b.f16'))).toBe('003c' + '00c0' + '0038' + 'ff7b' + '0000');
    expect(Buffer.from(at('e.q4_k.raw')).equals(Buffer.from(q4kBytes))).toBe(true);
    // All -1: scale d = -1 / -8 = 0.125 (f16 0x3000) and every value maps to nibble 0.
    expect(hex(at('d.q4_0'))).toBe(('0030' + '00'.repeat(16)).repeat(3));
    // All 0.25: d = 0.25 / 127, every value maps to 127.
    expect(hex(at('c.q8_0'))).toBe(('0818' + '7f'.repeat(32)).repeat(4));
  });

  it('copies a file with tensors byte-for-byte from what the reader returns', async () => {
    const src = join(dir, 'tensors.gguf');
    const file = await readGguf(src);
    const bytes = await readFile(src);
    const copy = join(dir, 'tensors-copy.gguf');
    // No alignment passed: the writer must take it from general.alignment (64).
    await writeGguf(copy, {
      metadata: file.metadata,
      tensors: file.tensors.map((t) => ({
        ...t,
        data: bytes.subarray(file.dataOffset + t.offset, file.dataOffset + t.offset + t.byteSize),
      })),
    });
    expect((await readFile(copy)).equals(bytes)).toBe(true);
  });

  it('computes byte sizes from the ggml type table', () => {
    expect(ggmlTensorByteSize(GgmlType.Q4_K, [512, 3])).toBe(2 * 3 * 144);
    expect(ggmlTensorByteSize(GgmlType.Q6_K, [256])).toBe(210);
    expect(ggmlTensorByteSize(GgmlType.IQ2_XXS, [256, 2])).toBe(132);
    expect(ggmlTensorByteSize(GgmlType.BF16, [7])).toBe(14);
    expect(ggmlTensorByteSize(GgmlType.TQ1_0, [256])).toBe(54);
    expect(ggmlTensorByteSize(GgmlType.MXFP4, [64])).toBe(34);
    expect(() => ggmlTensorByteSize(GgmlType.Q4_K, [128])).toThrow(/multiple of 256/);
    expect(GGML_TYPES.has(4)).toBe(false); // Q4_2: removed from ggml
    expect(GGML_TYPES.has(31)).toBe(false); // Q4_0_4_4: removed from gguf files
  });
});

describe('f16 conversion', () => {
  const cases: Array<[value: number, bits: number]> = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [0.5, 0x3800],
    [65504, 0x7bff], // largest finite half
    [65519, 0x7bff], // just below the rounding midpoint to infinity
    [65520, 0x7c00], // midpoint between 65504 and 65536 rounds to even: infinity
    [1e6, 0x7c00],
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -14 - 2 ** -24, 0x03ff], // largest subnormal
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // halfway to the smallest subnormal: ties to even (0)
    [2 ** -25 * 1.5, 0x0001], // above halfway
    [3 * 2 ** -25, 0x0002], // 1.5 ulp: ties to even (2)
    [5 * 2 ** -25, 0x0002], // 2.5 ulp: ties to even (2)
    [1 + 2 ** -11, 0x3c00], // halfway between 1 and next: even (1)
    [1 + 3 * 2 ** -11, 0x3c02], // halfway between 0x3c01 and 0x3c02: even
    [1 + 2 ** -11 + 2 ** -20, 0x3c01], // above halfway rounds up
    [0.1, 0x2e66],
    [-0.333333333, 0xb555],
    [NaN, 0x7e00],
  ];

  it.each(cases.map(([value, bits]) => ({ value, bits: bits.toString(16).padStart(4, '0') })))(
    '$value -> 0x$bits',
    ({ value, bits }) => {
      expect(f32ToF16Bits(value).toString(16).padStart(4, '0')).toBe(bits);
    },
  );

  it('keeps the sign of NaN and decodes halves exactly', () => {
    const negNaN = new Float32Array(new Uint32Array([0xffc00000]).buffer)[0]!;
    expect(f32ToF16Bits(negNaN)).toBe(0xfe00);
    expect(f16BitsToF32(0x3c00)).toBe(1);
    expect(f16BitsToF32(0x7bff)).toBe(65504);
    expect(f16BitsToF32(0x0001)).toBe(2 ** -24);
    expect(f16BitsToF32(0xfc00)).toBe(-Infinity);
    expect(f16BitsToF32(0x7e00)).toBeNaN();
    // Every finite half survives a round trip through float.
    const mismatches: number[] = [];
    for (let h = 0; h < 0x10000; h++) {
      const v = f16BitsToF32(h);
      if (!Number.isNaN(v) && f32ToF16Bits(v) !== h) mismatches.push(h);
    }
    expect(mismatches).toEqual([]);
  });
});

describe('quantization matches ggml (reference bytes from libggml quantize_row_*_ref)', () => {
  // Block 0: a ramp; block 1: mixed values; block 2: all zeros (scale 0).
  const input = new Float32Array(96);
  for (let j = 0; j < 32; j++) {
    input[j] = (j - 15.5) * 0.1;
    input[32 + j] = j % 3 === 0 ? 0.37 : -1.25 + j * 0.01;
  }

  it('Q8_0', () => {
    expect(hex(quantizeQ8_0(input))).toBe(
      '40228189919aa2aab2bac3cbd3dbe3ecf4fc040c141d252d353d464e565e666f777f' +
        '0021268182268485268788268a8b268d8e269091269394269798269a9b269d9e26a0' +
        '0000' + '00'.repeat(32),
    );
  });

  it('Q4_0', () => {
    expect(hex(quantizeQ4_0(input))).toBe(
      '3332809191a2a2b3b3c4c4d5d5e6e6f7f7f8' +
        'f6301a10a01a10a01a10a02a21a12a21a12a' +
        // All zeros: d = 0 / -8 is -0.0, so ggml stores the scale as f16 0x8000.
        '0080' +
        '88'.repeat(16),
    );
  });

  it('rejects lengths that are not whole blocks', () => {
    expect(() => quantizeQ8_0(new Float32Array(33))).toThrow(/multiple of 32/);
  });
});

describe('reader validation', () => {
  /** Minimal hand-rolled GGUF byte builder, so the tests can produce what the writer refuses to. */
  class Raw {
    parts: Buffer[] = [];
    u32(v: number): this {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(v);
      this.parts.push(b);
      return this;
    }
    u64(v: bigint | number): this {
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(BigInt(v));
      this.parts.push(b);
      return this;
    }
    i64(v: bigint | number): this {
      const b = Buffer.alloc(8);
      b.writeBigInt64LE(BigInt(v));
      this.parts.push(b);
      return this;
    }
    str(s: string): this {
      const b = Buffer.from(s);
      return this.u64(b.length).bytes(b);
    }
    bytes(b: Uint8Array): this {
      this.parts.push(Buffer.from(b));
      return this;
    }
    header(nTensors: number | bigint, nKv: number | bigint, version = 3): this {
      return this.u32(0x46554747).u32(version).u64(nTensors).u64(nKv);
    }
    kvU32(key: string, v: number): this {
      return this.str(key).u32(4).u32(v);
    }
    tensor(name: string, shape: Array<number | bigint>, type: number, offset: number | bigint): this {
      this.str(name).u32(shape.length);
      for (const d of shape) this.i64(d);
      return this.u32(type).u64(offset);
    }
    /** Pads to 32 and appends `n` bytes of tensor data. */
    data(n: number): this {
      const len = this.parts.reduce((a, b) => a + b.length, 0);
      return this.bytes(new Uint8Array((32 - (len % 32)) % 32 + n));
    }
    async write(name: string): Promise<string> {
      const p = join(dir, name);
      await writeFile(p, Buffer.concat(this.parts));
      return p;
    }
  }

  const corrupt = async (raw: Raw, message: RegExp): Promise<void> => {
    const path = await raw.write('bad.gguf');
    const e = await expectLoadError(readGguf(path), 'MODEL_CORRUPT', message);
    expect(e.path).toBe(path);
    expect(e.message).toContain(path);
  };

  it('accepts a hand-built v2 file', async () => {
    const path = await new Raw().header(1, 1, 2).kvU32('k', 5).tensor('t', [8], GgmlType.F32, 0).data(32).write('v2.gguf');
    const file = await readGguf(path);
    expect(file.version).toBe(2);
    expect(file.metadata.get('k')).toEqual({ type: 'u32', value: 5 });
    expect(file.tensors).toEqual([{ name: 't', type: 0, shape: [8], offset: 0, byteSize: 32 }]);
    expect(file.dataOffset).toBe(96);
  });

  it('rejects unsupported versions', async () => {
    await corrupt(new Raw().header(0, 0, 1), /version is 1 .*expected 2 or 3/);
    await corrupt(new Raw().header(0, 0, 4), /version is 4, expected 2 or 3/);
    await corrupt(new Raw().header(0, 0, 0x03000000), /big-endian/);
  });

  it('rejects truncated headers and metadata', async () => {
    await corrupt(new Raw().u32(0x46554747).u32(3).u32(0), /truncated while reading the tensor count/);
    await corrupt(new Raw().header(0, 1).str('key').u32(4).bytes(Uint8Array.of(1, 2)), /truncated while reading the value of 'key'/);
    await corrupt(new Raw().header(1, 0).str('t').u32(2).i64(8).u32(0), /truncated while reading dimension 1 of tensor 0 \('t'\)/);
  });

  it('rejects counts that cannot fit in the file', async () => {
    await corrupt(new Raw().header(0, 2n ** 62n), /declares 0 tensors and 4611686018427387904 metadata keys/);
    await corrupt(new Raw().header(1_000_000, 0), /declares 1000000 tensors/);
  });

  it('rejects string and array lengths beyond the end of the file', async () => {
    await corrupt(new Raw().header(0, 1).u64(1_000_000).bytes(new Uint8Array(16)), /the key of metadata entry 0 has length 1000000 .*exceeds/);
    await corrupt(
      new Raw().header(0, 1).str('arr').u32(9).u32(5).u64(2n ** 40n).bytes(new Uint8Array(16)),
      /array 'arr' declares 1099511627776 elements of type i32/,
    );
    await corrupt(
      new Raw().header(0, 1).str('arr').u32(9).u32(8).u64(3).str('a').u64(999).bytes(new Uint8Array(8)),
      /element 1 of array 'arr' has length 999/,
    );
  });

  it('rejects unknown value types, nested arrays, empty and duplicate keys', async () => {
    await corrupt(new Raw().header(0, 1).str('k').u32(13).u32(0), /'k' has unknown value type 13/);
    await corrupt(new Raw().header(0, 1).str('k').u32(9).u32(9).u64(0).u32(0), /nested arrays are not supported/);
    await corrupt(new Raw().header(0, 1).str('').u32(4).u32(0), /empty key/);
    await corrupt(new Raw().header(0, 2).kvU32('k', 1).kvU32('k', 2), /duplicate metadata key 'k'/);
    await corrupt(new Raw().header(0, 1).str('general.alignment').u32(4).u32(48), /general.alignment is 48, expected a power of 2/);
  });

  it('rejects bad tensor infos', async () => {
    await corrupt(new Raw().header(1, 0).tensor('t', [8], 31, 0).data(32), /unknown ggml type 31/);
    await corrupt(new Raw().header(1, 0).tensor('t', [8], 99, 0).data(32), /unknown ggml type 99/);
    await corrupt(new Raw().header(1, 0).tensor('t', [1, 1, 1, 1, 1], 0, 0).data(32), /has 5 dimensions, expected 1 to 4/);
    await corrupt(new Raw().header(1, 0).tensor('t', [], 0, 0).data(32), /has 0 dimensions/);
    await corrupt(new Raw().header(1, 0).tensor('t', [8, 0], 0, 0).data(32), /dimension 1 is 0, expected at least 1/);
    await corrupt(new Raw().header(1, 0).tensor('t', [-8], 0, 0).data(32), /dimension 0 is -8/);
    await corrupt(new Raw().header(1, 0).tensor('t', [16], GgmlType.Q8_0, 0).data(32), /multiple of the block size 32/);
    await corrupt(new Raw().header(1, 0).tensor('x'.repeat(64), [8], 0, 0).data(32), /64-byte name/);
    await corrupt(
      new Raw().header(2, 0).tensor('t', [8], 0, 0).tensor('t', [8], 0, 32).data(64),
      /duplicate tensor name 't'/,
    );
  });

  it('rejects misplaced tensor data', async () => {
    await corrupt(new Raw().header(1, 0).tensor('t', [8], 0, 8).data(64), /offset 8, expected a multiple of the alignment 32/);
    await corrupt(
      new Raw().header(2, 0).tensor('a', [16], 0, 0).tensor('b', [8], 0, 32).data(96),
      /'b' \(offset 32\) overlaps tensor 'a' \(offset 0, 64 bytes\)/,
    );
    await corrupt(new Raw().header(1, 0).tensor('t', [8], 0, 0).data(16), /tensor 't' data spans .* but the file is only/);
    await corrupt(
      new Raw().header(2, 0).tensor('a', [8], 0, 0).tensor('b', [8], 0, 64).data(96),
      /'b' has data offset 64, expected 32/,
    );
  });

  it('maps file system problems to load error codes', async () => {
    await expectLoadError(readGguf(join(dir, 'nope.gguf')), 'MODEL_NOT_FOUND', /not found: .*nope\.gguf/);
    await expectLoadError(readGguf(dir), 'MODEL_UNREADABLE', /is a directory/);
    const short = await new Raw().bytes(Uint8Array.of(0x47, 0x47)).write('short.gguf');
    await expectLoadError(readGguf(short), 'MODEL_NOT_GGUF', /only 2 bytes long \(47 47\)/);
  });
});

const haveVocab = existsSync(vocabPath('llama-spm')) && existsSync(vocabPath('qwen2'));
if (!haveVocab) console.warn(`fixture tests skipped: vocab files not found in ${fixtureVocabDir()} (set GENESIS_VOCAB_DIR)`);

describe.skipIf(!haveVocab)('fixtures', () => {
  it('produces byte-identical files for the same options and different ones otherwise', async () => {
    const a = await makeFixtureModel({ cacheDir: join(dir, 'cache-a'), seed: 7 });
    const b = await makeFixtureModel({ cacheDir: join(dir, 'cache-b'), seed: 7 });
    const c = await makeFixtureModel({ cacheDir: join(dir, 'cache-a'), seed: 8 });
    expect(a).not.toBe(b);
    expect(await sha256File(a)).toBe(await sha256File(b));
    expect(await sha256File(c)).not.toBe(await sha256File(a));
    // Cache hit: same path, no rewrite.
    expect(await makeFixtureModel({ cacheDir: join(dir, 'cache-a'), seed: 7 })).toBe(a);
  });

  it('survives concurrent creation and leaves no temp files', async () => {
    const cacheDir = join(dir, 'cache-concurrent');
    const paths = await Promise.all(Array.from({ length: 4 }, () => makeFixtureModel({ cacheDir, type: 'f16', nLayer: 1 })));
    expect(new Set(paths).size).toBe(1);
    expect(await readdir(cacheDir)).toEqual([paths[0]!.slice(cacheDir.length + 1)]);
    await readGguf(paths[0]!);
  });

  it('writes a llama model with the vocab file tokenizer and a llama-2 chat template', async () => {
    const path = await makeFixtureModel({ cacheDir: join(dir, 'cache-a') });
    const file = await readGguf(path);
    const vocab = await readGguf(vocabPath('llama-spm'));
    const tokenizerKeys = (m: Map<string, unknown>): string[] => [...m.keys()].filter((k) => k.startsWith('tokenizer.'));
    for (const key of tokenizerKeys(vocab.metadata)) {
      expect(file.metadata.get(key), key).toEqual(vocab.metadata.get(key));
    }
    const template = file.metadata.get('tokenizer.chat_template');
    expect(template?.type === 'string' && template.value).toContain('[INST]');
    expect(file.metadata.get('general.architecture')).toEqual({ type: 'string', value: 'llama' });
    expect(file.metadata.get('llama.context_length')).toEqual({ type: 'u32', value: 4096 });
    expect(file.metadata.get('llama.rope.dimension_count')).toEqual({ type: 'u32', value: 16 });
    expect(file.metadata.get('general.file_type')).toEqual({ type: 'u32', value: 7 });
    const byName = new Map(file.tensors.map((t) => [t.name, t]));
    expect(byName.get('token_embd.weight')).toMatchObject({ type: GgmlType.Q8_0, shape: [64, 32000] });
    expect(byName.get('output_norm.weight')).toMatchObject({ type: GgmlType.F32, shape: [64] });
    expect(byName.get('blk.1.attn_k.weight')).toMatchObject({ shape: [64, 32] });
    expect(byName.get('blk.1.ffn_down.weight')).toMatchObject({ shape: [128, 64] });
    expect(file.tensors).toHaveLength(3 + 2 * 9);
    expect(file.fileSize).toBeLessThan(6 * 1024 * 1024);
  });

  it('writes a qwen3moe model with experts, q/k norms and a ChatML template', async () => {
    const path = await makeFixtureModel({
      cacheDir: join(dir, 'cache-a'),
      arch: 'qwen3moe',
      type: 'q8_0',
      nLayer: 1,
      tieEmbeddings: true,
    });
    const file = await readGguf(path);
    const vocab = await readGguf(vocabPath('qwen2'));
    for (const [key, value] of vocab.metadata) {
      if (key.startsWith('tokenizer.') && key !== 'tokenizer.chat_template') expect(file.metadata.get(key), key).toEqual(value);
    }
    const template = file.metadata.get('tokenizer.chat_template');
    expect(template?.type === 'string' && template.value).toContain('<|im_start|>');
    expect(file.metadata.get('qwen3moe.expert_count')).toEqual({ type: 'u32', value: 8 });
    expect(file.metadata.get('qwen3moe.expert_used_count')).toEqual({ type: 'u32', value: 2 });
    expect(file.metadata.get('qwen3moe.expert_feed_forward_length')).toEqual({ type: 'u32', value: 64 });
    const byName = new Map(file.tensors.map((t) => [t.name, t]));
    expect(byName.get('blk.0.attn_q_norm.weight')).toMatchObject({ type: GgmlType.F32, shape: [16] });
    expect(byName.get('blk.0.ffn_gate_inp.weight')).toMatchObject({ type: GgmlType.F32, shape: [64, 8] });
    expect(byName.get('blk.0.ffn_gate_exps.weight')).toMatchObject({ type: GgmlType.Q8_0, shape: [64, 64, 8] });
    expect(byName.get('blk.0.ffn_down_exps.weight')).toMatchObject({ type: GgmlType.Q8_0, shape: [64, 64, 8] });
    expect(byName.get('token_embd.weight')).toMatchObject({ shape: [64, 151936] });
    expect(byName.has('output.weight')).toBe(false);
  });

  it('writes every kind of bad model file', async () => {
    const files = await makeCorruptFiles(join(dir, 'corrupt'), { cacheDir: join(dir, 'cache-a') });
    await expectLoadError(readGguf(files.missing), 'MODEL_NOT_FOUND');
    await expectLoadError(readGguf(files.empty), 'MODEL_NOT_GGUF', /empty/);
    await expectLoadError(readGguf(files.truncated), 'MODEL_CORRUPT', /data spans .* but the file is only/);
    await expectLoadError(readGguf(files.randomBytes), 'MODEL_NOT_GGUF', /expected a GGUF file \(magic 'GGUF'\), found bytes 00/);
    await expectLoadError(readGguf(files.wrongMagic), 'MODEL_NOT_GGUF', /found bytes 7f 45 4c 46/);
    await expectLoadError(readGguf(files.directory), 'MODEL_UNREADABLE');
    await expectLoadError(readGguf(files.badVersion), 'MODEL_CORRUPT', /version is 99, expected 2 or 3/);
    const unknown = await readGguf(files.unsupportedArch);
    expect(unknown.metadata.get('general.architecture')).toEqual({ type: 'string', value: 'genesis-unknown-arch' });
    expect(unknown.metadata.get('genesis-unknown-arch.block_count')).toEqual({ type: 'u32', value: 2 });
    expect(unknown.tensors.length).toBe(21);
  });
});
