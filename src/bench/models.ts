/**
 * Benchmark models: synthetic GGUFs with the layer shapes of real models, made by our own writer
 * (random weights, llama.cpp's real tokenizers). Speed depends on shapes and types, not on the
 * values, so these stand in for the real files on machines that have none; the layer count is
 * chosen per machine (a 2-core VM runs one layer, an H100 all of them).
 */
import { statSync } from 'node:fs';

import { ggmlTypeInfo, readGguf } from '../gguf/index.js';
import { makeSyntheticModel, type SyntheticModelOptions, type SyntheticWeightType } from '../synthetic/models.js';
import type { BenchModelShape } from './types.js';

export interface ModelPreset {
  /** What it is shaped like. */
  description: string;
  /** Layers of the real model. */
  realLayers: number;
  options: Omit<SyntheticModelOptions, 'nLayer' | 'type' | 'cacheDir'>;
}

export const MODEL_PRESETS = {
  // Qwen3-30B-A3B: hidden 2048, 32 query / 4 KV heads of 128, 128 experts of FFN 768, 8 used.
  'qwen3-30b-a3b': {
    description: 'Qwen3-30B-A3B-shaped MoE (2048 hidden, 128 experts × 768, 8 active, 32/4 heads × 128, Qwen vocab)',
    realLayers: 48,
    options: {
      arch: 'qwen3moe',
      vocab: 'qwen2',
      nEmbd: 2048,
      nHead: 32,
      nHeadKv: 4,
      headDim: 128,
      nFf: 6144,
      nExpert: 128,
      nExpertUsed: 8,
      nFfExp: 768,
      contextLength: 40960,
      name: 'bench-qwen3-30b-a3b-shape',
    },
  },
  // Llama-3-8B: hidden 4096, 32 query / 8 KV heads of 128, FFN 14336, Llama-3 vocab (128256).
  'llama-3-8b': {
    description: 'Llama-3-8B-shaped dense model (4096 hidden, FFN 14336, 32/8 heads × 128, Llama-3 vocab)',
    realLayers: 32,
    options: {
      arch: 'llama',
      vocab: 'llama-bpe',
      nEmbd: 4096,
      nHead: 32,
      nHeadKv: 8,
      headDim: 128,
      nFf: 14336,
      contextLength: 8192,
      name: 'bench-llama-3-8b-shape',
    },
  },
  // GLM-4.5-Air: hidden 4096, 96 query / 8 KV heads of 128, 128 experts of FFN 1408 (8 used, sigmoid
  // routing with a selection bias) plus one shared expert, and one multi-token-prediction block
  // (46 layers + 1 nextn); its first layer's dense FFN is an MoE here. Qwen vocab (GLM's is close).
  'glm-4.5-air': {
    description: 'GLM-4.5-Air-shaped MoE with an MTP block (4096 hidden, 128 experts × 1408, 8 active + 1 shared, 96/8 heads × 128, Qwen vocab)',
    realLayers: 46,
    options: {
      arch: 'glm4moe',
      vocab: 'qwen2',
      nEmbd: 4096,
      nHead: 96,
      nHeadKv: 8,
      headDim: 128,
      nFf: 10944,
      nExpert: 128,
      nExpertUsed: 8,
      nFfExp: 1408,
      mtpLayers: 1,
      contextLength: 131072,
      name: 'bench-glm-4.5-air-shape',
    },
  },
  // DeepSeek-V3: hidden 7168, 128 heads with latent attention (query/key heads 192 = 128 + 64 RoPE,
  // values 128, latent 512, query rank 1536), 256 experts of FFN 2048 in 8 groups (4 kept), 8 used,
  // sigmoid routing with a selection bias, weights scaled by 2.5, one shared expert. Its 3 leading
  // dense layers are MoE here. Qwen vocab (DeepSeek's has 129k tokens). One layer is ~6.5 GB at
  // Q4_0: generating it takes minutes, so benchmark slices have a few layers.
  'deepseek-v3': {
    description: 'DeepSeek-V3-shaped MoE (7168 hidden, MLA 128 heads, 256 experts × 2048 in 8 groups of which 4 kept, 8 active + 1 shared, Qwen vocab)',
    realLayers: 61,
    options: {
      arch: 'deepseek2',
      vocab: 'qwen2',
      nEmbd: 7168,
      nHead: 128,
      nHeadKv: 1,
      headDim: 192,
      nFf: 18432,
      nExpert: 256,
      nExpertUsed: 8,
      nFfExp: 2048,
      mla: { ropeDim: 64, vHeadDim: 128, kvLoraRank: 512, qLoraRank: 1536 },
      expertGroups: { count: 8, used: 4 },
      expertWeightsScale: 2.5,
      contextLength: 163840,
      name: 'bench-deepseek-v3-shape',
    },
  },
  // Qwen3.5-397B-A17B: hidden 4096, 60 layers in the 3 Gated DeltaNet : 1 gated attention plan,
  // attention 32 query / 2 KV heads of 256, 512 experts of FFN 1024 with 10 used and one shared
  // expert of 1024 behind a sigmoid gate, softmax routing. The DeltaNet layers are our writer's
  // (2 key and 4 value heads of 256, where the real model has 16 and 64 of 128): its routing and
  // expert widths, what the MoE issue measures, are real; its linear attention is lighter.
  'qwen35-397b-a17b': {
    description: 'Qwen3.5-397B-A17B-shaped hybrid MoE (4096 hidden, DeltaNet ×3 + attention 32/2 heads × 256, 512 experts × 1024, 10 active + 1 shared, Qwen3.5 vocab)',
    realLayers: 60,
    options: {
      arch: 'qwen35moe',
      vocab: 'qwen35',
      nEmbd: 4096,
      nHead: 32,
      nHeadKv: 2,
      headDim: 256,
      nFf: 1024,
      nExpert: 512,
      nExpertUsed: 10,
      nFfExp: 1024,
      contextLength: 262144,
      name: 'bench-qwen35-397b-a17b-shape',
    },
  },
  // The demo model's shape: seconds to run, for smoke tests of the harness itself.
  tiny: {
    description: 'tiny llama (256 hidden, FFN 512, llama-spm vocab): harness smoke tests',
    realLayers: 4,
    options: { arch: 'llama', vocab: 'llama-spm', nEmbd: 256, nHead: 4, nHeadKv: 4, nFf: 512, name: 'bench-tiny' },
  },
  // The same for the MTP path: a tiny glm4moe with one nextn block.
  'tiny-mtp': {
    description: 'tiny GLM-4.5-shaped MoE with an MTP block (256 hidden, 8 experts × 128, 2 active + 1 shared, Qwen vocab): harness smoke tests',
    realLayers: 4,
    options: { arch: 'glm4moe', vocab: 'qwen2', nEmbd: 256, nHead: 4, nHeadKv: 4, nExpert: 8, nExpertUsed: 2, nFfExp: 128, mtpLayers: 1, name: 'bench-tiny-mtp' },
  },
} satisfies Record<string, ModelPreset>;

export type ModelPresetName = keyof typeof MODEL_PRESETS;

export const WEIGHT_TYPES: readonly SyntheticWeightType[] = ['f16', 'q8_0', 'q4_0'];

export function isPresetName(name: string): name is ModelPresetName {
  return Object.hasOwn(MODEL_PRESETS, name);
}

export interface BenchModelSpec {
  preset: ModelPresetName;
  type: SyntheticWeightType;
  /** Default: the real model's layer count. */
  layers?: number;
  /** Layers from `quietFrom` (default 1) up scaled by this (SyntheticModelOptions.quietLayers): for draft agreement. */
  quiet?: number;
  quietFrom?: number;
}

/** Parses 'qwen3-30b-a3b:q4_0:2' (preset, type, layers; type and layers optional). */
export function parseModelSpec(spec: string, defaults: { type: SyntheticWeightType; layers?: number }): BenchModelSpec {
  const [preset = '', type = defaults.type, layers] = spec.split(':');
  if (!isPresetName(preset)) {
    throw new RangeError(`unknown benchmark model '${preset}': expected one of ${Object.keys(MODEL_PRESETS).join(', ')} (optionally :type:layers)`);
  }
  if (!(WEIGHT_TYPES as readonly string[]).includes(type) && type !== 'f32') {
    throw new RangeError(`unknown weight type '${type}' in '${spec}': expected one of ${WEIGHT_TYPES.join(', ')}`);
  }
  const n = layers === undefined ? defaults.layers : Number(layers);
  if (n !== undefined && (!Number.isInteger(n) || n < 1 || n > MODEL_PRESETS[preset].realLayers)) {
    throw new RangeError(`layer count in '${spec}' must be an integer from 1 to ${MODEL_PRESETS[preset].realLayers}`);
  }
  return { preset, type: type as SyntheticWeightType, ...(n !== undefined ? { layers: n } : {}) };
}

export function specLabel(spec: BenchModelSpec): string {
  return `${spec.preset}:${spec.type}:${spec.layers ?? MODEL_PRESETS[spec.preset].realLayers}L`;
}

/** Path of the spec's GGUF, generated on first use and cached (same spec, same bytes). */
export async function ensureBenchModel(spec: BenchModelSpec, cacheDir?: string): Promise<string> {
  const preset: ModelPreset = MODEL_PRESETS[spec.preset];
  return makeSyntheticModel({
    ...preset.options,
    nLayer: spec.layers ?? preset.realLayers,
    type: spec.type,
    // One layer of random weights is generated; the others reuse its bytes (see the option).
    shareLayerWeights: true,
    // And every routed expert expert 0's weights: a DeepSeek-V3 layer's 11 B expert parameters in
    // seconds instead of minutes (see the option; speed is unaffected).
    shareExpertWeights: true,
    ...(spec.quiet !== undefined ? { quietLayers: { from: spec.quietFrom ?? 1, scale: spec.quiet } } : {}),
    ...(cacheDir ? { cacheDir } : {}),
  });
}

/** The shape of a GGUF as the report records it, from the file's own metadata. */
export async function describeModel(path: string, preset = 'file'): Promise<BenchModelShape> {
  const gguf = await readGguf(path);
  const arch = String(gguf.metadata.get('general.architecture')?.value ?? 'unknown');
  const num = (key: string): number | undefined => {
    const v = gguf.metadata.get(`${arch}.${key}`)?.value;
    return typeof v === 'number' ? v : typeof v === 'bigint' ? Number(v) : undefined;
  };
  const nEmbd = num('embedding_length') ?? 0;
  const nHead = num('attention.head_count') ?? 0;
  const tokens = gguf.metadata.get('tokenizer.ggml.tokens');
  const types = new Map<string, number>();
  let params = 0;
  for (const t of gguf.tensors) {
    const n = t.shape.reduce((a, b) => a * Number(b), 1);
    params += n;
    const typeName = ggmlTypeInfo(t.type)?.name ?? `type${t.type}`;
    if (t.shape.length >= 2) types.set(typeName, (types.get(typeName) ?? 0) + n);
  }
  // The weight type is that of most matrix parameters (norms and routers stay F32).
  const type = [...types].sort((a, b) => b[1] - a[1])[0]?.[0] ?? 'unknown';
  const nExpert = num('expert_count');
  const groups = num('expert_group_count') ?? 0;
  return {
    preset,
    arch,
    type: type.toLowerCase(),
    nLayer: num('block_count') ?? 0,
    nEmbd,
    nHead,
    nHeadKv: num('attention.head_count_kv') ?? nHead,
    headDim: num('attention.key_length') ?? (nHead ? nEmbd / nHead : 0),
    ...(nExpert ? { nExpert, nExpertUsed: num('expert_used_count') ?? 0, nFfExp: num('expert_feed_forward_length') ?? 0 } : { nFf: num('feed_forward_length') ?? 0 }),
    ...(nExpert && groups > 1 ? { expertGroups: { count: groups, used: num('expert_group_used_count') ?? 0 } } : {}),
    vocabSize: tokens?.type === 'array' ? tokens.value.length : (num('vocab_size') ?? 0),
    fileBytes: statSync(path).size,
    params,
  };
}
