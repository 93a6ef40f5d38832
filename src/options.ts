/**
 * Public option types with their defaults, and validation that turns impossible values into
 * InvalidOptionError before anything reaches native code.
 */
import { availableParallelism, totalmem } from 'node:os';
import type { NativeLoadOptions, NativeSubmitOptions } from './binding.js';
import { InvalidOptionError } from './errors.js';
import type { MemoryBudget } from './memory.js';
import type { Model } from './model.js';

/** Expert counts per MoE layer, as `model.expertStats()` returns them (the object or its `layers`). */
export type ExpertHeat = { layers: ExpertHeatLayer[] } | ExpertHeatLayer[];
export interface ExpertHeatLayer {
  layer: number;
  counts: ArrayLike<number>;
}

/** ExpertHeat as the native side takes it: one { layer, counts } per layer, counts finite and ≥ 0. */
export function resolveExpertHeat(option: string, value: unknown): Array<{ layer: number; counts: number[] }> | undefined {
  if (value === undefined) return undefined;
  const expected = 'expert counts as model.expertStats() returns them: { layers: [{ layer, counts }] } or that array';
  const layers = Array.isArray(value) ? value : value !== null && typeof value === 'object' ? (value as { layers?: unknown }).layers : undefined;
  if (!Array.isArray(layers)) throw new InvalidOptionError(option, expected, value);
  return layers.map((item: unknown) => {
    const { layer, counts } = (item ?? {}) as { layer?: unknown; counts?: unknown };
    const list = Array.isArray(counts) || ArrayBuffer.isView(counts) ? Array.from(counts as ArrayLike<number>) : undefined;
    if (!Number.isInteger(layer) || (layer as number) < 0 || list === undefined || !list.every((c) => typeof c === 'number' && Number.isFinite(c) && c >= 0)) {
      throw new InvalidOptionError(option, expected, item);
    }
    return { layer: layer as number, counts: list };
  });
}

/** KV cache element types llama.cpp accepts for -ctk/-ctv. */
export const KV_CACHE_TYPES = ['f32', 'f16', 'bf16', 'q8_0', 'q4_0', 'q4_1', 'q5_0', 'q5_1', 'iq4_nl'] as const;
export type KvCacheType = (typeof KV_CACHE_TYPES)[number];

export interface LoadModelOptions {
  /** Tokens each sequence can hold (prompt + output). Default: the model's training context, at most 4096. */
  contextSize?: number;
  /** Sequences generated concurrently; more requests wait in a queue. Default 4. */
  maxSequences?: number;
  /** Token budget of one engine step (generating tokens + prompt chunks). Default 512. */
  batchSize?: number;
  /**
   * Layers to offload to the GPU; 'max' offloads all. Default 'max' when the build supports a GPU,
   * else 0. With 0 (and no rpcServers) the model runs on the CPU alone: unlike llama.cpp's `-ngl 0`,
   * neither the KV cache nor large batches' matrix products go to a GPU.
   */
  gpuLayers?: number | 'max';
  /** CPU threads for decoding. Default: all available cores. */
  threads?: number;
  /**
   * One KV buffer shared by all sequences (llama.cpp's unified KV). Default false: each sequence has
   * its own stream, so its attention never runs over other sequences' cells and its output does not
   * depend on what else is in the batch.
   */
  kvUnified?: boolean;
  /**
   * Each sequence is decoded on its own, with the whole step budget, so a request's decode calls
   * (and so its output, bit for bit) are those of a solo run whatever else is in flight. Costs the
   * throughput that batching sequences together gives (see benchmarks/RESULTS.md). Needs
   * kvUnified false. Default false: sequences share each decode, and kernels whose choice depends
   * on the batch's row count can make an output differ from its solo run in rare near-ties.
   */
  deterministic?: boolean;
  /**
   * Keep a finished request's KV cache in its sequence slot and reuse the longest common prefix
   * with the next prompt admitted there (the free slot sharing the longest prefix is chosen), as
   * llama-server's cache_prompt does: multi-turn chats and shared system prompts skip most of
   * their prefill. Default true; off with deterministic, and with kvUnified unless kvBudget or kvPaged
   * is set.
   */
  promptCache?: boolean;
  /**
   * Recurrent and hybrid models (Qwen3.5, Mamba...) with the prompt cache: their state cannot be cut
   * back to a shorter prefix, so without copies a cached prefix is reused only where the state sits
   * exactly at its end (a chat's next turn). With this many copies per sequence (default 4), taken
   * in host memory where a prompt crosses each multiple of batchSize tokens, a prompt that shares
   * part of the cached tokens (a system prompt, an edited turn) restarts from the nearest copy at or
   * below the shared prefix, as llama-server's context checkpoints do. Each copy is one sequence's
   * recurrent state (`stats().stateCheckpointBytes`). Another sequence's prompt sharing those
   * tokens can start from a copy too. 0 turns them off. Not with drafts.
   */
  stateCheckpoints?: number;
  /**
   * Host memory, in bytes, that all those copies of a model may hold together (default a quarter of
   * the machine's memory). Over it, the copies least recently taken or used go first; each
   * sequence's newest copy goes last, and the copy just taken always stays.
   */
  stateCheckpointMemory?: number;
  /**
   * One KV pool of this many tokens shared by all sequences (implies kvUnified), instead of room for
   * every sequence at full length (contextSize × maxSequences). Each sequence may still grow to
   * contextSize (at most the budget). A request is admitted when its prompt fits beside what the
   * running ones hold; when they outgrow the pool, the lowest-priority, latest admitted one goes back
   * to the queue and is recomputed (prompt and the tokens it generated, with its sampler state) once
   * there is room again, so its output is what it would have been. See `stats().preemptions`.
   * Finished sequences stay cached in the pool (promptCache) until room is needed, least recently
   * used first; a shared prefix is held once, however many sequences use it.
   * Not with speculative decoding or deterministic.
   */
  kvBudget?: number;
  /**
   * Paged attention over the shared KV (implies kvUnified): each sequence's attention reads only its
   * own cells, through a per-sequence index list, where the unified cache runs every sequence over
   * every cell behind a mask (work growing with the square of the concurrency). Each micro-batch
   * then carries an equal number of tokens per sequence, as with one stream per sequence. The cache
   * is one pool, as with kvBudget (admission, preemption, finished sequences kept as a prompt cache,
   * shared prefixes held once): of kvBudget tokens when set, else contextSize × maxSequences. Needs
   * flash attention (turned on; false is refused). CPU and CUDA. Default false.
   */
  kvPaged?: boolean;
  /**
   * With kvPaged: the pool's cells are taken in aligned blocks of this many (vLLM's block size), a
   * power of two up to 256. A sequence fills its last block before it takes another whose cells are
   * all free, so each sequence's K/V lies in runs of whole blocks (a host copy of a preempted
   * sequence moves one run per block and layer, not one per cell). Prefixes are shared between
   * sequences in whole blocks: a prompt copying another sequence's prefix computes the partial last
   * block itself (at most kvBlockSize − 1 tokens). A sequence's partly filled last block is held
   * whole, and the pool is counted in blocks (`stats().kvPoolUsedBlocks`). Default 1: cell by cell,
   * which holds the most sequences in a budget.
   */
  kvBlockSize?: number;
  /**
   * With kvBudget or kvPaged: host memory, in bytes, that preempted sequences' KV may take while they
   * wait to be admitted again. A preempted sequence's cells (and a hybrid model's recurrent state)
   * are copied there when they fit beside the copies already waiting, and copied back into free
   * cells when it is admitted again, bit for bit, instead of its prompt and generated tokens being
   * computed again; over the limit, or when the prompt cache holds as much of it, it is recomputed.
   * See `stats().kvSwapOuts`. Default 0: always recomputed. The copy is one transfer per run of
   * consecutive cells and layer: on the CPU a memory copy, far cheaper than recomputing; on a GPU a
   * generating sequence's cells lie one per step between the other sequences', so weigh it with the
   * benchmark's shared-prefix and preemption figures before turning it on there.
   */
  kvSwapMemory?: number;
  /**
   * Element type of the KV cache (llama.cpp's -ctk/-ctv): one type for K and V, or `{ k, v }`.
   * 'q8_0' holds about half of what 'f16' does per token, 'q4_0' about a quarter, at some cost in
   * accuracy. A quantized V needs flash attention ('auto' turns it on; false is refused). MLA models
   * (DeepSeek-V3-style) take one type for both. Paged attention reads every type. On CUDA, flash
   * attention takes every type but iq4_nl (K/V pairs without a kernel of their own are converted to
   * f16 for it; iq4_nl's attention runs on the CPU). Default 'f16'.
   */
  kvCacheType?: KvCacheType | { k: KvCacheType; v: KvCacheType };
  /** Flash attention: 'auto' lets llama.cpp decide. Default 'auto'. */
  flashAttention?: boolean | 'auto';
  /** Memory-map the weights instead of reading them. Default true. */
  useMmap?: boolean;
  /**
   * MoE models on a GPU: keep the expert tensors of the first N layers in host memory while the
   * rest of those layers runs on the GPU (llama.cpp's --n-cpu-moe). Default 0.
   */
  cpuMoeLayers?: number;
  /**
   * MoE models: count, per layer and expert, the tokens routed there (read with
   * `model.expertStats()`, and exported on the server's /metrics). The counting runs inside each
   * step's graph on the device that holds the layer, with no extra synchronisation; reads happen
   * between steps. Default false. A model without routed experts is an InvalidOptionError.
   */
  expertStats?: boolean;
  /**
   * MoE models whose experts stay in host memory (`cpuMoeLayers`): in each such layer, copies of
   * this many experts on the layer's device (its GPU), chosen by how many tokens each receives
   * (`expertHeat`, and with `expertStats` the counts of this run). Tokens routed to a copied expert
   * are computed there, the others by the CPU, which skips the copied ones; the output is the same.
   * Where --n-cpu-moe keeps whole layers' experts off the GPU, this keeps the hot experts of every
   * layer on it for the same memory. Read the choice with `model.expertPlacement()`, choose again
   * with `model.placeExperts()`. Layers whose experts are on the device already are left as they
   * are. Weights in host memory then keep ggml's plain layout (no CPU repacking, llama.cpp's
   * --no-repack), which the split reads; layers with expert biases or scales, or LoRA, are left as
   * loaded. Default 0 (none).
   */
  gpuExperts?: number;
  /**
   * Expert counts to choose the copied experts by (`gpuExperts`), such as an earlier run's
   * `model.expertStats()` saved as JSON: the `layers` array or the whole object. A layer's counts
   * must be as many as its experts (InvalidOptionError otherwise).
   */
  expertHeat?: ExpertHeat;
  /**
   * With `gpuExperts` and `expertStats`: choose the copied experts again after every this many
   * decoded tokens, by the counts so far (halved at each choice, so recent traffic weighs most).
   * The same number of copies, copied into place between two steps. Default 0 (only at load and on
   * `model.placeExperts()`).
   */
  expertReplaceTokens?: number;
  /**
   * Group-limited MoE routing (DeepSeek-V3/Kimi-K2-style expert groups) in one op, where llama.cpp
   * builds it from nine (native/patches/0005-moe-group-topk.patch): the same experts in the same
   * order, so the same output. CPU and CUDA. Models without expert groups route as before.
   * Default false.
   */
  fusedMoeRouting?: boolean;
  /**
   * How the offloaded layers are spread over several devices (llama.cpp's --split-mode):
   * 'layer' (default) gives each device whole layers and their KV cache; 'row' splits each
   * matrix's rows over the GPUs (CUDA); 'tensor' is llama.cpp's tensor parallelism over all the
   * offload devices; 'none' uses only `mainGpu`.
   */
  splitMode?: 'none' | 'layer' | 'row' | 'tensor';
  /**
   * Share of the offloaded layers (or rows) per offload device, in device order (the RPC servers'
   * devices first, then the local GPUs): [3, 1] gives the first device three quarters. Default: in
   * proportion to free memory.
   */
  tensorSplit?: number[];
  /** Index of the offload device for splitMode 'none', and for small tensors with 'row'. Default 0. */
  mainGpu?: number;
  /**
   * llama.cpp RPC servers ('host:port', e.g. started with `genesis rpc-server`) whose devices join
   * this model's split, ahead of the local GPUs. A server that cannot be reached is an RpcError
   * (RPC_UNREACHABLE); one lost later fails this model's requests with RPC_DISCONNECTED, and the
   * process carries on. The protocol has no authentication: use it on trusted networks only.
   */
  rpcServers?: string[];
  /**
   * Speculative decoding: a smaller loaded model with the same tokenizer drafts up to `maxTokens`
   * (default 4) tokens per sequence and step; this model checks them all in one batched decode and
   * keeps those its own sampler agrees with. The output is exactly this model's own (greedy: token
   * for token; sampled: each token is this model's draw, so the distribution is unchanged); what
   * changes is how many target decode steps it takes. The draft model stays loaded (its dispose()
   * is refused while this model lives). Not with `deterministic`.
   *
   * `{ mtp: true }` drafts with the model's own multi-token-prediction layers instead (GLM-4.5,
   * Qwen3.5, DeepSeek-V3 and others ship them: GGUF key `<arch>.nextn_predict_layers`), loaded
   * alongside the rest; each draft reads the token and this model's hidden state before it.
   */
  draft?: { model: Model; maxTokens?: number } | { mtp: true; maxTokens?: number };
  /**
   * Requests that may wait for a free sequence; one more makes generate() throw QueueFullError.
   * Default: no limit.
   */
  maxQueue?: number;
  /**
   * Fit the model into this memory (bytes of host RAM, or per kind of device): loadModel then
   * chooses contextSize, gpuLayers and cpuMoeLayers (see planMemory) and records why in
   * `model.plan`; MemoryBudgetError when nothing fits.
   */
  memoryBudget?: MemoryBudget | number;
  /** With memoryBudget: the smallest contextSize the plan may fall back to. Default min(contextSize, 512). */
  minContextSize?: number;
  /**
   * With memoryBudget, for a MoE model whose experts do not all fit on the GPU: 'layers' keeps the
   * experts of the fewest layers in host memory (llama.cpp's --n-cpu-moe); 'experts' keeps every
   * layer's experts there and copies as many of each layer's hottest to the GPU as fit
   * (`gpuExperts`, chosen by `expertHeat` and, with expertStats, this run's counts). Default 'layers'.
   */
  moePlacement?: 'layers' | 'experts';
  /** Called with load progress in [0, 1]. */
  onProgress?: (progress: number) => void;
  /**
   * Refuse the file unless the SHA-256 of its tensor data (llama.cpp's gguf-hash convention, as
   * `genesis hash` prints it) equals this hex digest. Hashed once per file identity, then cached.
   */
  expectedSha256?: string;
}

export interface SamplingOptions {
  /** Maximum tokens to generate (>= 1). Default: until end of generation or the context is full. */
  maxTokens?: number;
  /** 0 selects greedy decoding (argmax); top-k/top-p/min-p then do nothing. Default 0.8. */
  temperature?: number;
  /** Keep the k most likely tokens; 0 disables. Default 40. */
  topK?: number;
  /** Nucleus sampling mass in (0, 1]; 1 disables. Default 0.95. */
  topP?: number;
  /** Drop tokens below minP × the top probability; 0 disables. Default 0.05. */
  minP?: number;
  /** Repetition penalty (> 0; 1 disables). Default 1. */
  repeatPenalty?: number;
  /** OpenAI-style frequency penalty; 0 disables. Default 0. */
  frequencyPenalty?: number;
  /** OpenAI-style presence penalty; 0 disables. Default 0. */
  presencePenalty?: number;
  /** How many recent tokens the penalties consider (-1: whole context). Default 64. */
  penaltyLastN?: number;
  /** Additive bias per token id; -Infinity bans a token. */
  logitBias?: Record<number, number> | Map<number, number> | Array<[number, number]>;
  /** Seed of the sampler's random draw (uint32). Default: random, reported in the result. */
  seed?: number;
  /** Stop strings: generation ends where one appears; it is not part of the output. */
  stop?: string | string[];
  /** Keep generating past end-of-generation tokens. Default false. */
  ignoreEos?: boolean;
  /** Queue priority when all sequences are busy: higher first, FIFO among equals. Default 0. */
  priority?: number;
  /**
   * A GBNF grammar (llama.cpp's grammar format, rule `root`) the output must follow: tokens the
   * grammar forbids are never sampled. A grammar that does not parse is an InvalidOptionError.
   */
  grammar?: string;
  /** Cancels the generation; the iterator and `result` reject with AbortError. */
  signal?: AbortSignal;
  /**
   * With a model loaded with `draft`: false turns speculative decoding off for this request;
   * { maxTokens } drafts that many tokens per step (0 to 64). Default: the model's setting.
   */
  draft?: false | { maxTokens?: number };
}

export interface GenerateOptions extends SamplingOptions {
  /** For text prompts: add the model's BOS/special prefix tokens. Default true. */
  addSpecial?: boolean;
}

export interface ChatOptions extends SamplingOptions {
  /** A chat template to use instead of the model's own (tokenizer.chat_template). */
  chatTemplate?: string;
}

function isInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v);
}

function checkInt(name: string, v: unknown, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  if (!isInt(v) || v < min || v > max) throw new InvalidOptionError(name, `an integer in [${min}, ${max}]`, v);
  return v;
}

function checkNumber(name: string, v: unknown, min: number, max: number, expected?: string): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) {
    throw new InvalidOptionError(name, expected ?? `a number in [${min}, ${max}]`, v);
  }
  return v;
}

function checkBool(name: string, v: unknown): boolean | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') throw new InvalidOptionError(name, 'true or false', v);
  return v;
}

export function resolveLoadOptions(
  options: LoadModelOptions,
  model: { trainContextLength: number; gpuOffload: boolean; maxSequences: number },
): NativeLoadOptions {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('options', 'an object', options);
  const contextSize = checkInt('contextSize', options.contextSize, 2, 1 << 24) ?? Math.min(Math.max(model.trainContextLength, 2), 4096);
  const maxSequences = checkInt('maxSequences', options.maxSequences, 1, model.maxSequences) ?? 4;
  const batchSize = checkInt('batchSize', options.batchSize, 1, 1 << 16) ?? 512;
  if (batchSize < maxSequences) {
    throw new InvalidOptionError('batchSize', `at least maxSequences (${maxSequences}): every sequence needs a token per step`, batchSize);
  }
  const rpcServers = resolveRpcServers(options.rpcServers);
  let gpuLayers: number;
  if (options.gpuLayers === undefined) gpuLayers = model.gpuOffload || rpcServers.length > 0 ? -1 : 0;
  else if (options.gpuLayers === 'max') gpuLayers = -1;
  else gpuLayers = checkInt('gpuLayers', options.gpuLayers, 0, 100000, ) ?? 0;
  const threads = checkInt('threads', options.threads, 1, 1024) ?? availableParallelism();
  const kvBudget = checkInt('kvBudget', options.kvBudget, 16, 2 ** 31 - 1) ?? 0;
  if (kvBudget > 0 && options.kvUnified === false) throw new InvalidOptionError('kvBudget', 'kvUnified true or unset: the budget is one pool shared by all sequences', kvBudget);
  if (kvBudget > 0 && options.draft !== undefined) throw new InvalidOptionError('kvBudget', 'no draft: speculative decoding with a shared KV pool is not supported', kvBudget);
  const kvPaged = checkBool('kvPaged', options.kvPaged) ?? false;
  if (kvPaged && options.kvUnified === false) throw new InvalidOptionError('kvPaged', 'kvUnified true or unset: paged attention reads the shared KV cache', true);
  if (kvPaged && options.flashAttention === false) throw new InvalidOptionError('kvPaged', 'flashAttention true or unset: paged attention runs in the flash attention kernels', true);
  const kvUnified = (checkBool('kvUnified', options.kvUnified) ?? false) || kvBudget > 0 || kvPaged;
  const kvBlockSize = checkInt('kvBlockSize', options.kvBlockSize, 1, 256) ?? 1;
  if ((kvBlockSize & (kvBlockSize - 1)) !== 0) throw new InvalidOptionError('kvBlockSize', 'a power of two from 1 to 256', kvBlockSize);
  if (kvBlockSize > 1 && !kvPaged) throw new InvalidOptionError('kvBlockSize', 'kvPaged true: blocks are cells of the paged pool', kvBlockSize);
  const kvSwapMemory = checkInt('kvSwapMemory', options.kvSwapMemory, 0, Number.MAX_SAFE_INTEGER) ?? 0;
  if (kvSwapMemory > 0 && kvBudget === 0 && !kvPaged) {
    throw new InvalidOptionError('kvSwapMemory', 'kvBudget or kvPaged set: only sequences preempted from the shared KV pool are copied out', kvSwapMemory);
  }
  const deterministic = checkBool('deterministic', options.deterministic) ?? false;
  const promptCache = checkBool('promptCache', options.promptCache) ?? true;
  const stateCheckpoints = checkInt('stateCheckpoints', options.stateCheckpoints, 0, 64) ?? 4;
  const stateCheckpointMemory = checkInt('stateCheckpointMemory', options.stateCheckpointMemory, 1, Number.MAX_SAFE_INTEGER) ?? Math.floor(totalmem() / 4);
  if (deterministic && kvUnified) throw new InvalidOptionError('deterministic', 'kvUnified false: a shared KV buffer couples the sequences', true);
  if (kvPaged && options.draft !== undefined) throw new InvalidOptionError('kvPaged', 'no draft: speculative decoding with paged attention is not supported', true);
  const fa = options.flashAttention;
  if (fa !== undefined && fa !== 'auto' && typeof fa !== 'boolean') throw new InvalidOptionError('flashAttention', "true, false or 'auto'", fa);
  const kvCacheType = resolveKvCacheType(options.kvCacheType);
  if (kvCacheType.v !== 'f16' && kvCacheType.v !== 'bf16' && kvCacheType.v !== 'f32' && fa === false) {
    throw new InvalidOptionError('kvCacheType', `a V type of f16, bf16 or f32 with flashAttention false: a quantized V cache (${kvCacheType.v}) needs flash attention`, options.kvCacheType);
  }
  const useMmap = checkBool('useMmap', options.useMmap) ?? true;
  const cpuMoeLayers = checkInt('cpuMoeLayers', options.cpuMoeLayers, 0, 100000) ?? 0;
  const expertStats = checkBool('expertStats', options.expertStats) ?? false;
  const gpuExperts = checkInt('gpuExperts', options.gpuExperts, 0, 65536) ?? 0;
  const expertHeat = resolveExpertHeat('expertHeat', options.expertHeat);
  const expertReplaceTokens = checkInt('expertReplaceTokens', options.expertReplaceTokens, 0, Number.MAX_SAFE_INTEGER) ?? 0;
  if (gpuExperts === 0 && expertHeat !== undefined) throw new InvalidOptionError('expertHeat', 'gpuExperts set: the counts choose the experts it copies', true);
  if (gpuExperts === 0 && expertReplaceTokens > 0) throw new InvalidOptionError('expertReplaceTokens', 'gpuExperts set: it re-chooses the experts gpuExperts copies', expertReplaceTokens);
  if (expertReplaceTokens > 0 && !expertStats) throw new InvalidOptionError('expertReplaceTokens', 'expertStats: true (the counts it chooses by)', expertReplaceTokens);
  const fusedMoeRouting = checkBool('fusedMoeRouting', options.fusedMoeRouting) ?? false;
  const maxQueue = options.maxQueue === Infinity ? 0 : (checkInt('maxQueue', options.maxQueue, 1, 2 ** 31 - 1) ?? 0);
  if (options.expectedSha256 !== undefined && (typeof options.expectedSha256 !== 'string' || !/^[0-9a-fA-F]{64}$/.test(options.expectedSha256))) {
    throw new InvalidOptionError('expectedSha256', 'a SHA-256 digest of 64 hex characters', options.expectedSha256);
  }
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function') {
    throw new InvalidOptionError('onProgress', 'a function', options.onProgress);
  }
  let draftMaxTokens: number | undefined;
  let draftMtp = false;
  if (options.draft !== undefined) {
    const expected = '{ model: Model, maxTokens?: number } or { mtp: true, maxTokens?: number }';
    if (options.draft === null || typeof options.draft !== 'object') throw new InvalidOptionError('draft', expected, options.draft);
    if ('mtp' in options.draft) {
      if (options.draft.mtp !== true || 'model' in options.draft) throw new InvalidOptionError('draft.mtp', `true, without draft.model (${expected})`, options.draft.mtp);
      draftMtp = true;
    } else if (!('model' in options.draft)) {
      throw new InvalidOptionError('draft', expected, options.draft);
    }
    draftMaxTokens = checkInt('draft.maxTokens', options.draft.maxTokens, 1, 64) ?? 4;
    if (deterministic) throw new InvalidOptionError('draft', 'no draft with deterministic: true (each sequence is decoded alone, token by token)', options.draft);
  }
  const splitModes = ['none', 'layer', 'row', 'tensor'] as const;
  const splitMode = options.splitMode === undefined ? 1 : splitModes.indexOf(options.splitMode);
  if (splitMode < 0) throw new InvalidOptionError('splitMode', "'none', 'layer', 'row' or 'tensor'", options.splitMode);
  const tensorSplit = options.tensorSplit ?? [];
  if (
    !Array.isArray(tensorSplit) ||
    tensorSplit.length > 16 ||
    !tensorSplit.every((x) => typeof x === 'number' && Number.isFinite(x) && x >= 0) ||
    (tensorSplit.length > 0 && !tensorSplit.some((x) => x > 0))
  ) {
    throw new InvalidOptionError('tensorSplit', 'an array of at most 16 proportions ≥ 0, not all 0, one per offload device', options.tensorSplit);
  }
  const mainGpu = checkInt('mainGpu', options.mainGpu, 0, 15) ?? 0;
  return {
    contextSize,
    maxSequences,
    batchSize,
    gpuLayers,
    splitMode,
    tensorSplit,
    mainGpu,
    rpcServers,
    ...(draftMaxTokens !== undefined ? { draftMaxTokens } : {}),
    ...(draftMtp ? { draftMtp } : {}),
    threads,
    kvUnified,
    // Paged attention always runs over one pool: without a budget, of the whole cache, so that
    // admission, preemption and the prompt cache (finished sequences' cells kept until the room is
    // needed, prefixes shared by reference) work as with kvBudget.
    kvBudget: kvBudget > 0 ? kvBudget : kvPaged ? Math.min(contextSize * maxSequences, 2 ** 31 - 1) : 0,
    kvPaged,
    kvBlockSize,
    kvSwapMemory,
    kvCacheTypeK: kvCacheType.k,
    kvCacheTypeV: kvCacheType.v,
    deterministic,
    promptCache,
    stateCheckpoints,
    stateCheckpointMemory,
    flashAttention: kvPaged ? 1 : fa === undefined || fa === 'auto' ? -1 : fa ? 1 : 0,
    useMmap,
    maxQueue,
    cpuMoeLayers,
    expertStats,
    gpuExperts,
    ...(expertHeat !== undefined ? { expertHeat } : {}),
    expertReplaceTokens,
    fusedMoeRouting,
  };
}

/** kvCacheType as K and V types: a name for both, or { k, v }. */
function resolveKvCacheType(value: unknown): { k: KvCacheType; v: KvCacheType } {
  if (value === undefined) return { k: 'f16', v: 'f16' };
  const isType = (x: unknown): x is KvCacheType => typeof x === 'string' && (KV_CACHE_TYPES as readonly string[]).includes(x);
  const expected = `one of ${KV_CACHE_TYPES.join(', ')}, or { k, v } of those`;
  if (isType(value)) return { k: value, v: value };
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const { k, v, ...rest } = value as Record<string, unknown>;
    if (isType(k) && isType(v) && Object.keys(rest).length === 0) return { k, v };
  }
  throw new InvalidOptionError('kvCacheType', expected, value);
}

/** 'host:port' endpoints: an IPv4 address or a host name (llama.cpp's RPC client speaks IPv4), and a port in [1, 65535]; no duplicates. */
export function resolveRpcServers(servers: unknown): string[] {
  if (servers === undefined) return [];
  const expected = "an array of 'host:port' strings (at most 16, no duplicates), e.g. ['127.0.0.1:50052']";
  if (!Array.isArray(servers) || servers.length > 16) throw new InvalidOptionError('rpcServers', expected, servers);
  for (const s of servers) {
    const m = typeof s === 'string' ? /^([A-Za-z0-9.-]+):(\d{1,5})$/.exec(s) : null;
    if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw new InvalidOptionError('rpcServers', expected, s);
  }
  if (new Set(servers).size !== servers.length) throw new InvalidOptionError('rpcServers', expected, servers);
  return servers as string[];
}

function checkGrammar(grammar: unknown): string {
  if (grammar === undefined) return '';
  if (typeof grammar !== 'string' || grammar.trim().length === 0) throw new InvalidOptionError('grammar', 'a non-empty GBNF grammar string', grammar);
  return grammar;
}

function resolveLogitBias(bias: SamplingOptions['logitBias'], vocabSize: number): Array<[number, number]> {
  if (bias === undefined) return [];
  let entries: Array<[unknown, unknown]>;
  if (bias instanceof Map) entries = [...bias.entries()];
  else if (Array.isArray(bias)) entries = bias as Array<[unknown, unknown]>;
  else if (typeof bias === 'object' && bias !== null) entries = Object.entries(bias);
  else throw new InvalidOptionError('logitBias', 'an object { tokenId: bias }, a Map or [tokenId, bias] pairs', bias);
  return entries.map(([token, value]) => {
    const id = typeof token === 'string' ? Number(token) : token;
    if (!isInt(id) || id < 0 || id >= vocabSize) throw new InvalidOptionError('logitBias', `token ids in [0, ${vocabSize})`, token);
    if (typeof value !== 'number' || Number.isNaN(value) || value === Infinity) {
      throw new InvalidOptionError(`logitBias[${id}]`, 'a finite number or -Infinity', value);
    }
    return [id, value];
  });
}

export function resolveSamplingOptions(options: SamplingOptions, vocabSize: number): NativeSubmitOptions {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('options', 'an object', options);
  let stop: string[] = [];
  if (typeof options.stop === 'string') stop = [options.stop];
  else if (Array.isArray(options.stop)) stop = options.stop;
  else if (options.stop !== undefined) throw new InvalidOptionError('stop', 'a string or an array of strings', options.stop);
  for (const s of stop) {
    if (typeof s !== 'string' || s.length === 0) throw new InvalidOptionError('stop', 'non-empty strings', s);
  }
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) {
    throw new InvalidOptionError('signal', 'an AbortSignal', options.signal);
  }
  return {
    maxTokens: checkInt('maxTokens', options.maxTokens, 1, 2 ** 31 - 1) ?? -1,
    temperature: checkNumber('temperature', options.temperature, 0, 100) ?? 0.8,
    topK: checkInt('topK', options.topK, 0, vocabSize) ?? 40,
    topP: checkNumber('topP', options.topP, 0, 1) ?? 0.95,
    minP: checkNumber('minP', options.minP, 0, 1) ?? 0.05,
    repeatPenalty: checkNumber('repeatPenalty', options.repeatPenalty, Number.MIN_VALUE, 100, 'a number in (0, 100]') ?? 1,
    frequencyPenalty: checkNumber('frequencyPenalty', options.frequencyPenalty, -100, 100) ?? 0,
    presencePenalty: checkNumber('presencePenalty', options.presencePenalty, -100, 100) ?? 0,
    penaltyLastN: checkInt('penaltyLastN', options.penaltyLastN, -1, 2 ** 31 - 1) ?? 64,
    logitBias: resolveLogitBias(options.logitBias, vocabSize),
    seed: checkInt('seed', options.seed, 0, 2 ** 32 - 1) ?? Math.floor(Math.random() * 2 ** 32),
    stop,
    priority: checkInt('priority', options.priority, -(2 ** 31), 2 ** 31 - 1) ?? 0,
    ignoreEos: checkBool('ignoreEos', options.ignoreEos) ?? false,
    grammar: checkGrammar(options.grammar),
    draftMaxTokens: resolveRequestDraft(options.draft),
  };
}

function resolveRequestDraft(draft: SamplingOptions['draft']): number {
  if (draft === undefined) return -1;
  if (draft === false) return 0;
  if (draft === null || typeof draft !== 'object') throw new InvalidOptionError('draft', 'false, or { maxTokens?: number }', draft);
  return checkInt('draft.maxTokens', draft.maxTokens, 0, 64) ?? -1;
}
