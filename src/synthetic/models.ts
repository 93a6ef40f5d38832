/**
 * Synthetic GGUF models: real llama.cpp tokenizers (copied from llama.cpp's models/ggml-vocab-*.gguf)
 * on top of random-weight transformers, so the full load → tokenize → decode path runs without
 * downloading a model. Tests use tiny ones; the demo and benchmarks use the same generator.
 *
 * Files are cached under a name derived from a hash of the options and written atomically, so any
 * number of concurrent processes may ask for the same model.
 */

import { createHash, randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { encodeTensorData, GgmlType, readGguf, writeGguf } from '../gguf/index.js';
import type { GgufMetadataEntry, GgufTensorInput } from '../gguf/index.js';

/** Bump when the generator changes so stale cached files are not reused. */
const GENERATOR_VERSION = 1;

export type SyntheticArch = 'llama' | 'qwen3moe' | 'glm4moe' | 'qwen35' | 'qwen35moe' | 'deepseek2';
export type SyntheticWeightType = 'f32' | 'f16' | 'q8_0' | 'q4_0';
/** Any `ggml-vocab-<name>.gguf` in the vocab directory; these are the ones llama.cpp ships. */
export type SyntheticVocab =
  | 'llama-spm'
  | 'llama-bpe'
  | 'qwen2'
  | 'qwen35'
  | 'phi-3'
  | 'gpt-2'
  | 'falcon'
  | 'deepseek-llm'
  | 'deepseek-coder'
  | 'command-r'
  | 'starcoder'
  | 'mpt'
  | 'refact'
  | 'gpt-neox'
  | 'baichuan'
  | 'aquila'
  | (string & {});

export interface SyntheticModelOptions {
  arch?: SyntheticArch;
  /** Default: 'llama-spm' for llama, 'qwen35' for qwen35 and qwen35moe, 'qwen2' for the other MoE architectures. */
  vocab?: SyntheticVocab;
  /** Directory holding ggml-vocab-*.gguf. Default: `defaultVocabDir()`. */
  vocabDir?: string;
  nLayer?: number;
  nEmbd?: number;
  nHead?: number;
  nHeadKv?: number;
  /** Attention head size (key and value). Default nEmbd / nHead; Qwen3 uses 128 with 2048 / 32. */
  headDim?: number;
  /** Dense FFN width (llama); also written as feed_forward_length for qwen3moe. */
  nFf?: number;
  nExpert?: number;
  nExpertUsed?: number;
  nFfExp?: number;
  contextLength?: number;
  /** Storage type of the 2-D/3-D weight matrices (token_embd and output included); norms are F32. */
  type?: SyntheticWeightType;
  seed?: number;
  /**
   * Written as tokenizer.chat_template. Default: a llama-2 '[INST]' template for the llama-spm
   * vocab, ChatML ('<|im_start|>') otherwise. null writes none (removing the vocab file's own).
   */
  chatTemplate?: string | null;
  /** general.name. */
  name?: string;
  /**
   * Omit output.weight so llama.cpp reuses token_embd as the LM head (as tied-embedding models do);
   * halves the size of big-vocabulary fixtures. Default false. With random weights the residual
   * stream is dominated by the current token's own embedding, so greedy decoding of a tied fixture
   * mostly repeats the last token: fine for load/tokenize tests, not for "varied output" tests.
   */
  tieEmbeddings?: boolean;
  /**
   * Give every layer layer 0's weights (same bytes, separate tensors). Generating and quantizing
   * random weights in JS takes ~20 s per billion parameters; benchmark models with many big layers
   * use this to pay for one layer only. Speed is unaffected: each layer's tensors are still read
   * from their own memory. Default false.
   */
  shareLayerWeights?: boolean;
  /**
   * Give every routed expert of a layer expert 0's weights (same bytes, each expert still its own
   * slice of the 3-D expert tensors). A DeepSeek-V3 layer's experts are 11 billion parameters, four
   * minutes of generation; with this, one expert's 44 million. Speed is unaffected: each expert's
   * slice is still read from its own memory, and routing (the router's weights) stays random; only
   * the experts' outputs no longer differ. Default false.
   */
  shareExpertWeights?: boolean;
  /**
   * Scale the matrices of layers `from` and up by `scale` (their norms stay 1): those layers then
   * add little to the residual stream, so the model predicts nearly what its first `from` layers
   * alone predict while costing every layer's compute. With the same seed, a `from`-layer model is
   * a draft for it whose agreement falls as `scale` grows (speculative decoding benchmarks).
   * Default: none.
   */
  quietLayers?: { from: number; scale: number } | null;
  /**
   * glm4moe and qwen35: multi-token-prediction (nextn) blocks after the `nLayer` trunk layers, as
   * GLM-4.5 and Qwen3.5 ship one (`<arch>.nextn_predict_layers`). Each is a full decoder block (MoE,
   * or attention and dense FFN) plus `eh_proj`, which
   * maps [norm(embedding of the token), norm(hidden state before it)] to the block's input; here its
   * embedding half is the identity, so with quiet blocks (`quietLayers`) the MTP predicts what the
   * trunk would predict for the next token, and drafts are accepted as often as the trunk's layers
   * leave that prediction alone. Default 0.
   */
  mtpLayers?: number;
  /**
   * Scale of eh_proj's hidden-state half relative to the block's other matrices (which
   * `quietLayers` may scale down): larger makes drafts depend more on the target's hidden state,
   * and agree with it less often. Default 1.
   */
  mtpStateScale?: number;
  /**
   * deepseek2 (DeepSeek-V3 shape): multi-head latent attention. headDim is the query/key head size
   * (no-RoPE part + RoPE part, 192 in DeepSeek-V3). Defaults from headDim as in DeepSeek-V3: ropeDim
   * headDim/3 (64), vHeadDim the rest (128), kvLoraRank 4 × vHeadDim (512), qLoraRank 3 × kvLoraRank
   * (1536). nHeadKv is not used: MLA caches one latent head.
   */
  mla?: { qLoraRank?: number; kvLoraRank?: number; ropeDim?: number; vHeadDim?: number };
  /** deepseek2: group-limited routing, experts in `count` groups of which `used` are kept. Default none. */
  expertGroups?: { count: number; used: number };
  /** deepseek2: routed_scaling_factor (2.5 in DeepSeek-V3). Default 1. */
  expertWeightsScale?: number;
  /**
   * glm4moe, deepseek2: the expert-selection bias (exp_probs_b), one per expert, in every layer.
   * A large value on some experts makes every token pick them (routing known in advance, for
   * tests). Default: small random values.
   */
  expertBias?: number[] | null;
  /** Default: `defaultModelCacheDir()`. */
  cacheDir?: string;
}

type ResolvedOptions = Required<Omit<SyntheticModelOptions, 'cacheDir' | 'chatTemplate' | 'mla'>> & {
  chatTemplate: string | null;
  mla: Required<NonNullable<SyntheticModelOptions['mla']>>;
};

export const CHATML_TEMPLATE =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

// The template Meta shipped with Llama-2-chat; llama.cpp detects it as llama2-sys-strip.
export const LLAMA2_TEMPLATE =
  "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}" +
  '{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}' +
  "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
  "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}" +
  "{% else %}{% set content = message['content'] %}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}" +
  "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/** The package root: src/synthetic and dist/synthetic are both two levels down. */
export function repoRoot(): string {
  return fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');
}

/** Default cache of generated models: $GENESIS_CACHE_DIR/models or ~/.cache/genesis-runtime/models. */
export function defaultModelCacheDir(): string {
  const base = process.env['GENESIS_CACHE_DIR'] ?? join(process.env['XDG_CACHE_HOME'] ?? join(homedir(), '.cache'), 'genesis-runtime');
  return join(base, 'models');
}

/** Where ggml-vocab-*.gguf files live: $GENESIS_VOCAB_DIR, else `<repoRoot>/deps/llama.cpp/models`. */
export function defaultVocabDir(): string {
  return process.env['GENESIS_VOCAB_DIR'] || join(repoRoot(), 'deps', 'llama.cpp', 'models');
}

export function vocabPath(vocab: string, vocabDir = defaultVocabDir()): string {
  return join(vocabDir, `ggml-vocab-${vocab}.gguf`);
}

function resolve(options: SyntheticModelOptions): ResolvedOptions {
  const arch = options.arch ?? 'llama';
  const vocab = options.vocab ?? (arch === 'llama' ? 'llama-spm' : arch === 'qwen35' || arch === 'qwen35moe' ? 'qwen35' : 'qwen2');
  const type = options.type ?? 'q8_0';
  const r: ResolvedOptions = {
    arch,
    vocab,
    vocabDir: options.vocabDir ?? defaultVocabDir(),
    nLayer: options.nLayer ?? 2,
    nEmbd: options.nEmbd ?? 64,
    nHead: options.nHead ?? 4,
    nHeadKv: options.nHeadKv ?? 2,
    headDim: options.headDim ?? Math.floor((options.nEmbd ?? 64) / (options.nHead ?? 4)),
    nFf: options.nFf ?? 128,
    nExpert: options.nExpert ?? 8,
    nExpertUsed: options.nExpertUsed ?? 2,
    nFfExp: options.nFfExp ?? 64,
    contextLength: options.contextLength ?? 4096,
    type,
    seed: options.seed ?? 1,
    chatTemplate: options.chatTemplate === undefined ? (vocab === 'llama-spm' ? LLAMA2_TEMPLATE : CHATML_TEMPLATE) : options.chatTemplate,
    name: options.name ?? `genesis-fixture-${arch}-${vocab}-${type}`,
    tieEmbeddings: options.tieEmbeddings ?? false,
    shareLayerWeights: options.shareLayerWeights ?? false,
    shareExpertWeights: options.shareExpertWeights ?? false,
    quietLayers: options.quietLayers ?? null,
    mtpLayers: options.mtpLayers ?? 0,
    mtpStateScale: options.mtpStateScale ?? 1,
    mla: resolveMla(options),
    expertGroups: options.expertGroups ?? { count: 1, used: 1 },
    expertWeightsScale: options.expertWeightsScale ?? 1,
    expertBias: options.expertBias ?? null,
  };
  validate(r);
  return r;
}

function resolveMla(options: SyntheticModelOptions): ResolvedOptions['mla'] {
  const headDim = options.headDim ?? Math.floor((options.nEmbd ?? 64) / (options.nHead ?? 4));
  const ropeDim = options.mla?.ropeDim ?? 2 * Math.floor(headDim / 6);
  const vHeadDim = options.mla?.vHeadDim ?? headDim - ropeDim;
  const kvLoraRank = options.mla?.kvLoraRank ?? 4 * vHeadDim;
  return { ropeDim, vHeadDim, kvLoraRank, qLoraRank: options.mla?.qLoraRank ?? 3 * kvLoraRank };
}

function validate(o: ResolvedOptions): void {
  const positive = ['nLayer', 'nEmbd', 'nHead', 'nHeadKv', 'headDim', 'nFf', 'nExpert', 'nExpertUsed', 'nFfExp', 'contextLength'] as const;
  for (const k of positive) {
    if (!Number.isInteger(o[k]) || o[k] <= 0) throw new RangeError(`fixture option ${k} must be a positive integer, got ${o[k]}`);
  }
  if (o.nHead % o.nHeadKv !== 0) throw new RangeError(`nHead (${o.nHead}) must be divisible by nHeadKv (${o.nHeadKv})`);
  if ((o.arch === 'qwen35' || o.arch === 'qwen35moe') && o.nLayer < 2) {
    throw new RangeError(`nLayer must be at least 2 for ${o.arch}: a hybrid needs a Gated DeltaNet layer and an attention layer, got ${o.nLayer}`);
  }
  if (o.headDim % 2 !== 0) throw new RangeError(`head size (headDim, default nEmbd/nHead) must be even for RoPE, got ${o.headDim}`);
  if (!Number.isFinite(o.mtpStateScale) || o.mtpStateScale < 0) throw new RangeError(`mtpStateScale must be a number ≥ 0, got ${o.mtpStateScale}`);
  if (!Number.isInteger(o.mtpLayers) || o.mtpLayers < 0 || (o.mtpLayers > 0 && o.arch !== 'glm4moe' && o.arch !== 'qwen35' && o.arch !== 'qwen35moe')) {
    throw new RangeError(`mtpLayers must be an integer ≥ 0, and > 0 only with arch 'glm4moe', 'qwen35' or 'qwen35moe', got ${o.mtpLayers} (${o.arch})`);
  }
  if (o.nExpertUsed > o.nExpert) throw new RangeError(`nExpertUsed (${o.nExpertUsed}) must not exceed nExpert (${o.nExpert})`);
  const q = o.quietLayers;
  if (q !== null && (!Number.isInteger(q.from) || q.from < 0 || !Number.isFinite(q.scale) || q.scale < 0)) {
    throw new RangeError(`quietLayers needs an integer from ≥ 0 and a scale ≥ 0, got ${JSON.stringify(q)}`);
  }
  const g = o.expertGroups;
  if (!Number.isInteger(g.count) || !Number.isInteger(g.used) || g.count < 1 || g.used < 1 || g.used > g.count || o.nExpert % g.count !== 0 || (g.count > 1 && o.arch !== 'deepseek2')) {
    throw new RangeError(`expertGroups needs count dividing nExpert (${o.nExpert}) and 1 ≤ used ≤ count, and count > 1 only with arch 'deepseek2'; got ${JSON.stringify(g)}`);
  }
  if (g.used * (o.nExpert / g.count) < o.nExpertUsed) throw new RangeError(`expertGroups.used (${g.used}) groups cannot hold nExpertUsed (${o.nExpertUsed}) experts`);
  if (o.expertBias !== null && (o.arch !== 'glm4moe' && o.arch !== 'deepseek2' || o.expertBias.length !== o.nExpert || !o.expertBias.every(Number.isFinite))) {
    throw new RangeError(`expertBias needs arch 'glm4moe' or 'deepseek2' and nExpert (${o.nExpert}) finite numbers`);
  }
  if (!Number.isFinite(o.expertWeightsScale) || o.expertWeightsScale <= 0) throw new RangeError(`expertWeightsScale must be a number > 0, got ${o.expertWeightsScale}`);
  const m = o.mla;
  if (o.arch === 'deepseek2') {
    for (const [k, v] of Object.entries(m)) {
      if (!Number.isInteger(v) || v <= 0) throw new RangeError(`mla.${k} must be a positive integer, got ${v}`);
    }
    if (m.ropeDim % 2 !== 0 || m.ropeDim >= o.headDim) throw new RangeError(`mla.ropeDim must be even and smaller than headDim (${o.headDim}), got ${m.ropeDim}`);
  }
  if (o.type === 'q8_0' || o.type === 'q4_0') {
    // Every quantized matrix has one of these as its contiguous dimension (ne0).
    const rows =
      o.arch === 'llama' || o.arch === 'qwen35'
        ? { nEmbd: o.nEmbd, nFf: o.nFf, 'headDim*nHead': o.headDim * o.nHead }
        : o.arch === 'deepseek2'
          ? { nEmbd: o.nEmbd, nFfExp: o.nFfExp, 'mla.qLoraRank': m.qLoraRank, 'mla.kvLoraRank': m.kvLoraRank, 'headDim-mla.ropeDim': o.headDim - m.ropeDim, 'mla.vHeadDim*nHead': m.vHeadDim * o.nHead }
          : { nEmbd: o.nEmbd, nFfExp: o.nFfExp, 'headDim*nHead': o.headDim * o.nHead };
    for (const [k, v] of Object.entries(rows)) {
      if (v % 32 !== 0) throw new RangeError(`type ${o.type} needs ${k} to be a multiple of 32, got ${v}`);
    }
  }
}

const TYPE_IDS: Record<SyntheticWeightType, number> = {
  f32: GgmlType.F32,
  f16: GgmlType.F16,
  q8_0: GgmlType.Q8_0,
  q4_0: GgmlType.Q4_0,
};

// llama_ftype values (include/llama.h).
const FILE_TYPES: Record<SyntheticWeightType, number> = { f32: 0, f16: 1, q4_0: 2, q8_0: 7 };

/** mulberry32: tiny, fast, and identical on every platform, which is all a fixture needs. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function fnv1a(s: string, seed: number): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** Uniform(-scale, scale) values; each tensor has its own stream so tensor order does not matter. */
function uniform(seed: number, name: string, n: number, scale: number): Float32Array {
  const next = mulberry32(fnv1a(name, seed));
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (next() * 2 - 1) * scale;
  return out;
}

interface FixtureContent {
  metadata: GgufMetadataEntry[];
  tensors: GgufTensorInput[];
}

async function buildContent(o: ResolvedOptions): Promise<FixtureContent> {
  const vocabFile = vocabPath(o.vocab, o.vocabDir);
  if (!existsSync(vocabFile)) {
    throw new Error(
      `fixture vocab file not found: ${vocabFile}; build deps/llama.cpp or set GENESIS_VOCAB_DIR to llama.cpp's models/ directory`,
    );
  }
  const vocab = await readGguf(vocabFile);
  const tokens = vocab.metadata.get('tokenizer.ggml.tokens');
  if (tokens?.type !== 'array' || tokens.itemType !== 'string') {
    throw new Error(`${vocabFile} has no tokenizer.ggml.tokens string array`);
  }
  const nVocab = tokens.value.length;

  const a = o.arch;
  const headDim = o.headDim;
  const u32 = (key: string, value: number): GgufMetadataEntry => ({ key, type: 'u32', value });
  const f32 = (key: string, value: number): GgufMetadataEntry => ({ key, type: 'f32', value });

  const metadata: GgufMetadataEntry[] = [
    { key: 'general.architecture', type: 'string', value: a },
    { key: 'general.name', type: 'string', value: o.name },
    u32('general.file_type', FILE_TYPES[o.type]),
    u32('general.quantization_version', 2),
    u32(`${a}.vocab_size`, nVocab),
    u32(`${a}.context_length`, o.contextLength),
    u32(`${a}.embedding_length`, o.nEmbd),
    u32(`${a}.block_count`, o.nLayer + o.mtpLayers),
    u32(`${a}.feed_forward_length`, o.nFf),
    u32(`${a}.attention.head_count`, o.nHead),
    // MLA caches one latent head per token.
    u32(`${a}.attention.head_count_kv`, a === 'deepseek2' ? 1 : o.nHeadKv),
    f32(`${a}.attention.layer_norm_rms_epsilon`, a === 'llama' ? 1e-5 : 1e-6),
    f32(`${a}.rope.freq_base`, a === 'llama' ? 10_000 : 1_000_000),
    u32(`${a}.rope.dimension_count`, a === 'deepseek2' ? o.mla.ropeDim : headDim),
  ];
  if (a === 'deepseek2') {
    // MLA as llama.cpp's converter writes it: the cache holds [latent | RoPE part] per token.
    metadata.push(
      u32(`${a}.attention.key_length`, o.mla.kvLoraRank + o.mla.ropeDim),
      u32(`${a}.attention.value_length`, o.mla.kvLoraRank),
      u32(`${a}.attention.key_length_mla`, headDim),
      u32(`${a}.attention.value_length_mla`, o.mla.vHeadDim),
      u32(`${a}.attention.q_lora_rank`, o.mla.qLoraRank),
      u32(`${a}.attention.kv_lora_rank`, o.mla.kvLoraRank),
    );
  } else if (a !== 'llama' || headDim !== o.nEmbd / o.nHead) {
    metadata.push(u32(`${a}.attention.key_length`, headDim), u32(`${a}.attention.value_length`, headDim));
  }
  const hybrid = a === 'qwen35' || a === 'qwen35moe';
  if (hybrid && o.mtpLayers > 0) metadata.push(u32(`${a}.nextn_predict_layers`, o.mtpLayers));
  if (hybrid) {
    // Qwen3.5's hybrid: three Gated DeltaNet layers, then one gated-attention layer, repeating.
    // DeltaNet heads here: 2 key heads and 4 value heads of headDim; mRoPE sections for half the
    // rotary pairs, as the real model rotates a quarter of each head.
    const pairs = headDim / 2;
    metadata.push(
      // A slice of fewer than 4 layers still ends with an attention layer.
      u32(`${a}.full_attention_interval`, Math.min(4, o.nLayer)),
      u32(`${a}.ssm.conv_kernel`, 4),
      u32(`${a}.ssm.state_size`, headDim),
      u32(`${a}.ssm.group_count`, 2),
      u32(`${a}.ssm.time_step_rank`, 4),
      u32(`${a}.ssm.inner_size`, 4 * headDim),
      { key: `${a}.rope.dimension_sections`, type: 'array', itemType: 'i32', value: [Math.ceil(pairs / 3), Math.ceil(pairs / 3), pairs - 2 * Math.ceil(pairs / 3), 0] },
    );
  }
  if (a !== 'llama' && a !== 'qwen35') {
    metadata.push(
      u32(`${a}.expert_count`, o.nExpert),
      u32(`${a}.expert_used_count`, o.nExpertUsed),
      u32(`${a}.expert_feed_forward_length`, o.nFfExp),
    );
  }
  if (a === 'qwen35moe') {
    // Qwen3.5-MoE: softmax routing over the experts, normalised top-k weights, and one shared
    // expert of the same width behind a sigmoid gate (ffn_gate_inp_shexp).
    metadata.push(u32(`${a}.expert_shared_feed_forward_length`, o.nFfExp));
  }
  if (a === 'glm4moe') {
    // GLM-4.5's routing: sigmoid scores plus a selection bias, normalized weights, one shared expert.
    metadata.push(
      u32(`${a}.expert_shared_count`, 1),
      u32(`${a}.leading_dense_block_count`, 0),
      u32(`${a}.expert_gating_func`, 2),
      { key: `${a}.expert_weights_norm`, type: 'bool', value: true },
      f32(`${a}.expert_weights_scale`, 1),
      u32(`${a}.nextn_predict_layers`, o.mtpLayers),
    );
  }
  if (a === 'deepseek2') {
    // DeepSeek-V3's routing: sigmoid scores plus a selection bias, optionally group-limited,
    // normalized and scaled weights, one shared expert, no leading dense layers here.
    metadata.push(
      u32(`${a}.expert_shared_count`, 1),
      u32(`${a}.leading_dense_block_count`, 0),
      u32(`${a}.expert_gating_func`, 2),
      { key: `${a}.expert_weights_norm`, type: 'bool', value: true },
      f32(`${a}.expert_weights_scale`, o.expertWeightsScale),
      u32(`${a}.expert_group_count`, o.expertGroups.count),
      u32(`${a}.expert_group_used_count`, o.expertGroups.used),
    );
  }
  for (const [key, value] of vocab.metadata) {
    if (key.startsWith('tokenizer.') && key !== 'tokenizer.chat_template') metadata.push({ key, ...value });
  }
  if (o.chatTemplate !== null) metadata.push({ key: 'tokenizer.chat_template', type: 'string', value: o.chatTemplate });

  const wtype = TYPE_IDS[o.type];
  const tensors: GgufTensorInput[] = [];
  const ones = (name: string, n: number): void => {
    tensors.push({ name, type: GgmlType.F32, shape: [n], data: () => new Float32Array(n).fill(1) });
  };
  const shared = new Map<string, Uint8Array>();
  // Uniform(±1/sqrt(fan_in)) keeps every projection's output variance near a third of its input's,
  // so activations stay O(1) through the layers and the logits are neither flat nor saturated.
  const matrix = (name: string, shape: number[], type = wtype, scale = 1 / Math.sqrt(shape[0]!)): void => {
    const n = shape.reduce((x, y) => x * y, 1);
    const layer = /^blk\.(\d+)\./.exec(name);
    const quiet = o.quietLayers !== null && layer !== null && Number(layer[1]) >= o.quietLayers.from ? o.quietLayers.scale : 1;
    scale *= quiet;
    // Random values of `source`'s seed, or with shareExpertWeights for a 3-D expert tensor, expert
    // 0's slice encoded once and repeated for every expert (a slice is whole rows: its own blocks).
    const values = (source: string): Float32Array | Uint8Array => {
      if (!o.shareExpertWeights || shape.length !== 3 || !name.includes('_exps.')) return uniform(o.seed, source, n, scale);
      const [cols, rows, experts] = shape as [number, number, number];
      const one = encodeTensorData({ name, type, shape: [cols, rows, 1] }, uniform(o.seed, source, cols * rows, scale));
      const out = new Uint8Array(one.length * experts);
      for (let e = 0; e < experts; e++) out.set(one, e * one.length);
      return out;
    };
    if (!o.shareLayerWeights || !layer) {
      tensors.push({ name, type, shape, data: () => values(name) });
      return;
    }
    // Layers are written in order: layer 0 encodes each shared tensor once (once more scaled for
    // quiet layers), the last layer frees it.
    const source = name.replace(layer[0], 'blk.0.');
    const key = quiet === 1 ? source : `${source}@${quiet}`;
    const last = layer[0] === `blk.${o.nLayer + o.mtpLayers - 1}.`;
    tensors.push({
      name,
      type,
      shape,
      data: () => {
        const bytes = shared.get(key) ?? encodeTensorData({ name, type, shape }, values(source));
        if (last) shared.delete(key);
        else shared.set(key, bytes);
        return bytes;
      },
    });
  };

  const nEmbdKv = headDim * o.nHeadKv;
  // Embeddings get unit scale so the token identity is not drowned by the first layer's output.
  matrix('token_embd.weight', [o.nEmbd, nVocab], wtype, 1);
  ones('output_norm.weight', o.nEmbd);
  if (!o.tieEmbeddings) matrix('output.weight', [o.nEmbd, nVocab]);
  for (let i = 0; i < o.nLayer + o.mtpLayers; i++) {
    const p = `blk.${i}.`;
    ones(`${p}attn_norm.weight`, o.nEmbd);
    if (hybrid && i < o.nLayer && (i + 1) % Math.min(4, o.nLayer) !== 0) {
      // Gated DeltaNet (linear attention): 2 key heads, 4 value heads, all of headDim.
      const keyDim = 2 * headDim;
      const valueDim = 4 * headDim;
      matrix(`${p}attn_qkv.weight`, [o.nEmbd, 2 * keyDim + valueDim]);
      matrix(`${p}attn_gate.weight`, [o.nEmbd, valueDim]);
      matrix(`${p}ssm_conv1d.weight`, [4, 2 * keyDim + valueDim], GgmlType.F32);
      tensors.push({ name: `${p}ssm_dt.bias`, type: GgmlType.F32, shape: [4], data: () => new Float32Array(4).fill(0) });
      // A = -exp(A_log) < 0: each step keeps a share of the state.
      tensors.push({ name: `${p}ssm_a`, type: GgmlType.F32, shape: [4], data: () => new Float32Array(4).fill(-1) });
      matrix(`${p}ssm_beta.weight`, [o.nEmbd, 4], GgmlType.F32);
      matrix(`${p}ssm_alpha.weight`, [o.nEmbd, 4], GgmlType.F32);
      ones(`${p}ssm_norm.weight`, headDim);
      matrix(`${p}ssm_out.weight`, [valueDim, o.nEmbd]);
    } else if (a === 'deepseek2') {
      // Multi-head latent attention: low-rank query, a shared latent for keys and values plus a
      // RoPE key part, per-head up-projections of the latent (k_b, v_b).
      const m = o.mla;
      matrix(`${p}attn_q_a.weight`, [o.nEmbd, m.qLoraRank]);
      ones(`${p}attn_q_a_norm.weight`, m.qLoraRank);
      matrix(`${p}attn_q_b.weight`, [m.qLoraRank, o.nHead * headDim]);
      matrix(`${p}attn_kv_a_mqa.weight`, [o.nEmbd, m.kvLoraRank + m.ropeDim]);
      ones(`${p}attn_kv_a_norm.weight`, m.kvLoraRank);
      matrix(`${p}attn_k_b.weight`, [headDim - m.ropeDim, m.kvLoraRank, o.nHead]);
      matrix(`${p}attn_v_b.weight`, [m.kvLoraRank, m.vHeadDim, o.nHead]);
      matrix(`${p}attn_output.weight`, [o.nHead * m.vHeadDim, o.nEmbd]);
    } else {
      // Qwen3.5's attention projects a gate with each query head.
      matrix(`${p}attn_q.weight`, [o.nEmbd, headDim * o.nHead * (hybrid ? 2 : 1)]);
      matrix(`${p}attn_k.weight`, [o.nEmbd, nEmbdKv]);
      matrix(`${p}attn_v.weight`, [o.nEmbd, nEmbdKv]);
      matrix(`${p}attn_output.weight`, [headDim * o.nHead, o.nEmbd]);
      if (hybrid) {
        ones(`${p}attn_q_norm.weight`, headDim);
        ones(`${p}attn_k_norm.weight`, headDim);
      }
    }
    ones(a === 'glm4moe' || hybrid ? `${p}post_attention_norm.weight` : `${p}ffn_norm.weight`, o.nEmbd);
    if (a === 'llama' || a === 'qwen35') {
      matrix(`${p}ffn_gate.weight`, [o.nEmbd, o.nFf]);
      matrix(`${p}ffn_up.weight`, [o.nEmbd, o.nFf]);
      matrix(`${p}ffn_down.weight`, [o.nFf, o.nEmbd]);
    } else {
      if (a !== 'deepseek2' && a !== 'qwen35moe') {
        ones(`${p}attn_q_norm.weight`, headDim);
        ones(`${p}attn_k_norm.weight`, headDim);
      }
      // The router stays F32 as in converted Qwen3-MoE files (llama-quantize never quantizes it).
      matrix(`${p}ffn_gate_inp.weight`, [o.nEmbd, o.nExpert], GgmlType.F32);
      matrix(`${p}ffn_gate_exps.weight`, [o.nEmbd, o.nFfExp, o.nExpert]);
      matrix(`${p}ffn_up_exps.weight`, [o.nEmbd, o.nFfExp, o.nExpert]);
      matrix(`${p}ffn_down_exps.weight`, [o.nFfExp, o.nEmbd, o.nExpert]);
    }
    if (a === 'qwen35moe') {
      matrix(`${p}ffn_gate_inp_shexp.weight`, [o.nEmbd], GgmlType.F32);
      matrix(`${p}ffn_gate_shexp.weight`, [o.nEmbd, o.nFfExp]);
      matrix(`${p}ffn_up_shexp.weight`, [o.nEmbd, o.nFfExp]);
      matrix(`${p}ffn_down_shexp.weight`, [o.nFfExp, o.nEmbd]);
    }
    if (a === 'glm4moe' || a === 'deepseek2') {
      tensors.push({ name: `${p}exp_probs_b.bias`, type: GgmlType.F32, shape: [o.nExpert], data: () => (o.expertBias ? Float32Array.from(o.expertBias) : uniform(o.seed, `${p}exp_probs_b`, o.nExpert, 0.1)) });
      matrix(`${p}ffn_gate_shexp.weight`, [o.nEmbd, o.nFfExp]);
      matrix(`${p}ffn_up_shexp.weight`, [o.nEmbd, o.nFfExp]);
      matrix(`${p}ffn_down_shexp.weight`, [o.nFfExp, o.nEmbd]);
    }
    if (i >= o.nLayer) {
      ones(`${p}nextn.enorm.weight`, o.nEmbd);
      ones(`${p}nextn.hnorm.weight`, o.nEmbd);
      // [embedding half | hidden-state half] → nEmbd: identity on the first, random on the second.
      const quiet = o.quietLayers !== null && i >= o.quietLayers.from ? o.quietLayers.scale : 1;
      const name = `${p}nextn.eh_proj.weight`;
      tensors.push({
        name,
        type: GgmlType.F32,
        shape: [2 * o.nEmbd, o.nEmbd],
        data: () => {
          const w = uniform(o.seed, name, 2 * o.nEmbd * o.nEmbd, (quiet * o.mtpStateScale) / Math.sqrt(2 * o.nEmbd));
          for (let r = 0; r < o.nEmbd; r++) {
            for (let c = 0; c < o.nEmbd; c++) w[r * 2 * o.nEmbd + c] = r === c ? 1 : 0;
          }
          return w;
        },
      });
    }
  }
  return { metadata, tensors };
}

const inFlight = new Map<string, Promise<string>>();

/**
 * Path of a cached GGUF built from `options` (same options ⇒ byte-identical file), creating it on
 * first use. Throws when the vocab file is missing.
 */
export async function makeSyntheticModel(options: SyntheticModelOptions = {}): Promise<string> {
  const o = resolve(options);
  const cacheDir = options.cacheDir ?? defaultModelCacheDir();
  const vocabStat = await stat(vocabPath(o.vocab, o.vocabDir)).catch(() => undefined);
  // The vocab file's size stands in for its content so a different llama.cpp checkout gets a new name.
  const { vocabDir: _vocabDir, quietLayers, mtpLayers, mtpStateScale, expertBias, shareExpertWeights, ...hashed } = o;
  // Options added later are hashed only when set, so earlier files keep their names.
  const key = JSON.stringify({
    v: GENERATOR_VERSION,
    ...hashed,
    vocabBytes: vocabStat?.size ?? null,
    ...(quietLayers ? { quietLayers } : {}),
    ...(mtpLayers ? { mtpLayers, mtpStateScale } : {}),
    ...(expertBias ? { expertBias } : {}),
    ...(shareExpertWeights ? { shareExpertWeights } : {}),
  });
  const hash = createHash('sha256').update(key).digest('hex').slice(0, 16);
  const path = join(cacheDir, `${o.arch}-${o.vocab}-${o.type}-${hash}.gguf`);

  const pending = inFlight.get(path);
  if (pending) return pending;
  const job = (async () => {
    if (existsSync(path)) return path;
    await mkdir(cacheDir, { recursive: true });
    const content = await buildContent(o);
    const tmp = `${path}.${process.pid}.${randomUUID()}.tmp`;
    try {
      await writeGguf(tmp, content);
      // rename() is atomic: a concurrent reader sees either no file or a complete one.
      await rename(tmp, path);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    return path;
  })();
  inFlight.set(path, job);
  try {
    return await job;
  } finally {
    inFlight.delete(path);
  }
}

