/**
 * Checks of model hyperparameters that llama.cpp asserts on (GGML_ASSERT aborts the whole process)
 * instead of returning an error. Found by feeding it bad values; keep in step with the pinned source.
 */
import { ModelLoadError } from '../errors.js';
import type { GgufFile } from './types.js';

// Architectures whose graph builders assert head size == rotary dims == value head size
// (GGML_ASSERT(n_embd_head == n_rot) in src/models/<arch>.cpp); others allow partial rotary.
const FULL_ROTARY = new Set([
  'llama', 'llama4', 'mistral3', 'qwen2', 'qwen2moe', 'qwen2vl', 'qwen3', 'qwen3moe', 'qwen3vl', 'qwen3vlmoe',
  'deepseek', 'granite', 'granitemoe', 'olmo', 'olmo2', 'olmoe', 'internlm2', 'baichuan', 'starcoder2', 'exaone',
  'exaone4', 'smollm3', 'dbrx', 'grok', 'arctic', 'dots1', 'xverse', 'orion', 'falcon', 'deci', 'plamo', 'arcee',
]);

// Hybrid architectures whose recurrent layers follow full_attention_interval (src/models/<arch>.cpp),
// with llama.cpp's default interval: layer i attends when (i + 1) % interval == 0.
const HYBRID_INTERVAL: Record<string, number> = { qwen35: 4, qwen35moe: 4, qwen3next: 4, 'minimax-01': 8 };

// src/llama-hparams.h of the pinned llama.cpp.
const LLAMA_MAX_LAYERS = 512;
const LLAMA_MAX_EXPERTS = 1024;

function uint(file: GgufFile, key: string): number | undefined {
  const v = file.metadata.get(key);
  if (v === undefined) return undefined;
  if (v.type === 'array' || v.type === 'string' || v.type === 'bool') return undefined;
  return Number(v.value);
}

export function checkHyperparameters(file: GgufFile, arch: string): void {
  const fail = (what: string) => {
    throw new ModelLoadError('MODEL_CORRUPT', file.path, `${file.path}: ${what}`);
  };
  const layers = uint(file, `${arch}.block_count`);
  if (layers !== undefined && (layers < 1 || layers > LLAMA_MAX_LAYERS)) {
    fail(`${arch}.block_count is ${layers}, expected 1 to ${LLAMA_MAX_LAYERS}`);
  }
  const experts = uint(file, `${arch}.expert_count`);
  const used = uint(file, `${arch}.expert_used_count`);
  if (experts !== undefined && experts > LLAMA_MAX_EXPERTS) fail(`${arch}.expert_count is ${experts}, expected at most ${LLAMA_MAX_EXPERTS}`);
  // Expert counts and group-limited routing (llama_model::load_hparams asserts these).
  const groups = uint(file, `${arch}.expert_group_count`) ?? 0;
  const groupsUsed = uint(file, `${arch}.expert_group_used_count`) ?? 0;
  if (experts !== undefined && experts > 0) {
    if (used === undefined || used < 1) fail(`${arch}.expert_used_count is ${used ?? 'missing'}, expected 1 to expert_count (${experts})`);
    else if (used > experts) fail(`${arch}.expert_used_count (${used}) exceeds ${arch}.expert_count (${experts})`);
    if (groups >= experts) fail(`${arch}.expert_group_count (${groups}) must be below ${arch}.expert_count (${experts})`);
    if (groups > 1 && experts % groups !== 0) fail(`${arch}.expert_count (${experts}) is not a multiple of ${arch}.expert_group_count (${groups})`);
    if (groups > 1 && (groupsUsed < 1 || groupsUsed >= groups)) {
      fail(`${arch}.expert_group_used_count is ${groupsUsed}, expected 1 to ${groups - 1} (below expert_group_count ${groups})`);
    }
  } else {
    if (used) fail(`${arch}.expert_used_count is ${used} on a model without experts (expert_count ${experts ?? 'missing'}), expected 0`);
    if (groups) fail(`${arch}.expert_group_count is ${groups} on a model without experts (expert_count ${experts ?? 'missing'}), expected 0`);
  }
  // Hybrids: llama.cpp divides by the interval, and a model with no attention layer, or no recurrent
  // one, aborts when the empty half of its memory is first used.
  const interval = uint(file, `${arch}.full_attention_interval`);
  if (interval === 0) fail(`${arch}.full_attention_interval is 0, expected at least 1`);
  const defaultInterval = HYBRID_INTERVAL[arch];
  if (defaultInterval !== undefined && layers !== undefined) {
    const every = interval ?? defaultInterval;
    const trunk = layers - (uint(file, `${arch}.nextn_predict_layers`) ?? 0);
    const pattern = file.metadata.get(`${arch}.attention.recurrent_layers`);
    const listed = pattern?.type === 'array';
    const attending = listed ? Array.from(pattern.value as ArrayLike<unknown>).slice(0, trunk).filter((recurrent) => !recurrent).length : Math.floor(trunk / every);
    const model = `${arch} with ${trunk} layer${trunk === 1 ? '' : 's'}`;
    if (trunk >= 1 && attending === 0) {
      fail(`${model} has no attention layer (${listed ? 'attention.recurrent_layers marks every one recurrent' : `one in every ${every}, full_attention_interval`}): expected at least one`);
    }
    if (trunk >= 1 && attending === trunk) {
      fail(`${model} has no recurrent layer (${listed ? 'attention.recurrent_layers marks none recurrent' : `full_attention_interval ${every} makes every layer attend`}): expected at least one`);
    }
  }
  // Norm epsilons are asserted non-negative when the graph runs (ggml-cpu rms_norm), not at load.
  for (const [key, value] of file.metadata) {
    if (!key.startsWith(`${arch}.`) || !/epsilon$/.test(key)) continue;
    const eps = value.type === 'f32' || value.type === 'f64' ? value.value : NaN;
    if (!(eps >= 0) || !Number.isFinite(eps)) fail(`${key} is ${value.type === 'array' ? 'an array' : String(value.value)}, expected a finite number >= 0`);
  }
  const freqBase = file.metadata.get(`${arch}.rope.freq_base`);
  if (freqBase && !((freqBase.type === 'f32' || freqBase.type === 'f64') && Number.isFinite(freqBase.value) && freqBase.value > 0)) {
    fail(`${arch}.rope.freq_base is ${freqBase.type === 'array' ? 'an array' : String(freqBase.value)}, expected a finite number > 0`);
  }
  const heads = uint(file, `${arch}.attention.head_count`);
  const embd = uint(file, `${arch}.embedding_length`);
  const keyLength = uint(file, `${arch}.attention.key_length`);
  const rope = uint(file, `${arch}.rope.dimension_count`);
  if (heads === 0) fail(`${arch}.attention.head_count is 0, expected at least 1`);
  // Rotary dims cannot exceed the head size (llama.cpp asserts in the qwen3 family).
  const headSize = keyLength ?? (heads && embd ? embd / heads : undefined);
  if (rope !== undefined && headSize !== undefined && rope > headSize) {
    fail(`${arch}.rope.dimension_count (${rope}) exceeds the attention head size (${headSize})`);
  }
  if (FULL_ROTARY.has(arch)) {
    const valueLength = uint(file, `${arch}.attention.value_length`);
    if (rope !== undefined && headSize !== undefined && rope !== headSize) {
      fail(`${arch}.rope.dimension_count (${rope}) must equal the attention head size (${headSize}) for ${arch}`);
    }
    if (keyLength !== undefined && valueLength !== undefined && keyLength !== valueLength) {
      fail(`${arch}.attention.key_length (${keyLength}) must equal attention.value_length (${valueLength}) for ${arch}`);
    }
  }
}
