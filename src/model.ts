/**
 * Model: a loaded GGUF with its context and continuous-batching engine.
 *
 *   const model = await loadModel('model.gguf', { contextSize: 4096, maxSequences: 8 });
 *   for await (const chunk of model.generate('Hello', { maxTokens: 32 })) process.stdout.write(chunk.text);
 *   await model.dispose();
 */
import { binding, type NativeEvent, type NativeExpertPlacement, type NativeLoadOptions, type NativeModel, type NativeModelInfo, type NativePlacement, type NativeSubmitOptions } from './binding.js';
import { AbortError, ContextOverflowError, DisposedError, GenesisError, InvalidOptionError, ModelLoadError, type RpcError, toGenesisError } from './errors.js';
import { Generation, type GenerationResult } from './generation.js';
import { checkHyperparameters } from './gguf/hparams.js';
import { readGguf } from './gguf/index.js';
import { verifyModelFile } from './verify/identity.js';
import { resolveExpertHeat, resolveLoadOptions, resolveSamplingOptions, type ChatOptions, type ExpertHeat, type GenerateOptions, type LoadModelOptions } from './options.js';
import { planMemory, toDeviceMemory, type DeviceMemoryEstimate, type MemoryPlan } from './memory.js';
import { checkFingerprints, type FingerprintCheckOptions, type FingerprintPair, type FingerprintVerdict } from './verify/fingerprint.js';

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | (string & {});
  content: string;
}

/** What sits where in a loaded model: how it is split, and per device its bytes and layers. */
export interface Placement extends Omit<NativePlacement, 'devices'> {
  /** Host memory first, then the offload devices in split order (RPC servers' devices first). */
  devices: DeviceMemoryEstimate[];
}

export interface ModelInfo extends Omit<NativeModelInfo, 'placement'> {
  path: string;
  placement: Placement;
}

export interface EmbeddingResult {
  /** One unit-length vector per input, in input order. */
  embeddings: number[][];
  /** How token states were pooled: 'mean', 'cls' or 'last'. */
  pooling: string;
  /** Tokens of all inputs together. */
  promptTokens: number;
}

export interface EngineStats {
  /** Sequences generating or prefilling now. */
  active: number;
  /** Requests waiting for a free sequence. */
  queued: number;
  /** Engine steps (one llama_decode each) since load. */
  steps: number;
  /** Tokens decoded (prompt + generated) since load. */
  decodedTokens: number;
  /**
   * Prompt tokens of the requests admitted since load. A request preempted from the KV pool counts
   * again when it is admitted again, with the tokens it had generated.
   */
  promptTokens: number;
  /**
   * Of those, the tokens reused from the prompt cache or another sequence's KV instead of decoded:
   * cachedPromptTokens / promptTokens is the prefix cache's hit rate.
   */
  cachedPromptTokens: number;
  /** Tokens held in the KV cache by active sequences. */
  kvUsedTokens: number;
  /** Tokens the KV cache can hold: contextSize × maxSequences, or kvBudget when set. */
  kvCapacityTokens: number;
  /**
   * kvBudget or kvPaged: cells of the pool held after the latest step, by running sequences and by
   * finished ones kept as a cache, cells shared by several sequences counted once (0 without a
   * pool). kvCapacityTokens − kvPoolUsedTokens is free.
   */
  kvPoolUsedTokens: number;
  /**
   * The pool in blocks (kvBlockSize cells each; 1 without kvBlockSize): all of them (0 without a
   * pool) and those holding at least one used cell, a partly filled block held whole.
   * kvPoolBlocks − kvPoolUsedBlocks are free. kvPoolUsedTokens is kvPoolUsedBlocks × kvBlockSize.
   */
  kvBlockSize: number;
  kvPoolBlocks: number;
  kvPoolUsedBlocks: number;
  /**
   * kvBudget: sequences preempted since load to make room in the shared KV pool (each went back to
   * the queue and was recomputed when admitted again; its output is unchanged).
   */
  preemptions: number;
  /**
   * kvSwapMemory: of those preemptions, the ones whose KV was copied to host memory, the ones
   * copied back into the pool when admitted again (not recomputed; a copy the cache made needless
   * is dropped), and the host memory the copies waiting in the queue hold now.
   */
  kvSwapOuts: number;
  kvSwapIns: number;
  kvSwapBytes: number;
  /** Speculative decoding since load: tokens the draft model proposed, and those kept. */
  draftTokens: number;
  acceptedDraftTokens: number;
  /**
   * Prompts that started from another sequence's KV cache (a shared system prompt, the earlier turns
   * of a chat served in another slot), copied instead of computed again; their tokens count in
   * cachedPromptTokens.
   */
  sharedPrefixCopies: number;
  /**
   * Recurrent and hybrid models (stateCheckpoints): prompts that started from a copy of a
   * sequence's recurrent state, their tokens up to it counting in cachedPromptTokens; and the host
   * memory the copies hold now.
   */
  stateCheckpointRestores: number;
  stateCheckpointBytes: number;
  /**
   * Where the engine's time went since load, in seconds: whole steps (admission, scheduling,
   * decoding, sampling, drafting); the llama_decode call (graph build and, on a GPU, kernel
   * launches); the wait for the device to finish a step; sampling and draft verification.
   * step − decode − wait − sample is the engine's own bookkeeping and drafting.
   */
  seconds: { step: number; decode: number; wait: number; sample: number };
}

/** Expert load of a MoE model (loaded with expertStats): tokens routed to each expert, per layer. */
export interface ExpertStats {
  /** Experts per layer (the widest layer's count). */
  experts: number;
  /** Experts each token is routed to. */
  expertsUsed: number;
  layers: ExpertLayerStats[];
}

export interface ExpertLayerStats {
  /** Layer index in the model. */
  layer: number;
  /** Tokens routed to each expert since load (or the last reset). */
  counts: number[];
  /** Routed picks in all: tokens through this layer × experts used per token. */
  total: number;
  /**
   * The busiest expert's count over the mean (1 is perfectly balanced; experts-per-layer ÷
   * experts-used is the most a layer can show). 0 before any token.
   */
  imbalance: number;
}

/** Expert placement (a model loaded with gpuExperts): which experts of each layer have copies on its device. */
export interface ExpertPlacement {
  layers: ExpertPlacementLayer[];
  /** Why choosing again every expertReplaceTokens stopped (the copies stay as they were). */
  error?: string;
}

export interface ExpertPlacementLayer {
  /** Layer index in the model. */
  layer: number;
  /** The experts with a copy on the layer's device, hottest first. */
  experts: number[];
  /** Device memory the copies take. */
  bytes: number;
  /** With expertStats, since this choice: expert picks in this layer, and how many went to the copies. */
  routed: number;
  routedToCopies: number;
}

let nextRequestId = 1;

export class Model implements AsyncDisposable {
  readonly path: string;
  readonly info: ModelInfo;
  /** With loadModel's memoryBudget: the plan it loaded with (options chosen, estimate, reasons). */
  plan: MemoryPlan | undefined;

  #native: NativeModel;
  #active = new Map<number, Generation>();
  #disposed = false;
  #disposing: Promise<void> | undefined;
  #bosText: string | undefined;
  #onEvents: (events: NativeEvent[]) => void;

  private constructor(path: string, native: NativeModel, route: { handler?: (events: NativeEvent[]) => void }) {
    this.path = path;
    this.#native = native;
    const info = native.info();
    this.info = { path, ...info, placement: { ...info.placement, devices: info.placement.devices.map(toDeviceMemory) } };
    this.#onEvents = (events) => this.#dispatch(events);
    route.handler = this.#onEvents;
  }

  /** The native object of a loaded model given as an option (InvalidOptionError otherwise). */
  static #nativeOf(model: unknown, option: string): NativeModel {
    if (!(model instanceof Model) || model.#disposed) throw new InvalidOptionError(option, 'a loaded Model that is not disposed', model);
    return model.#native;
  }

  /** @internal use loadModel() */
  static async _load(path: string, options: LoadModelOptions = {}): Promise<Model> {
    let plan: MemoryPlan | undefined;
    if (options.memoryBudget !== undefined) {
      plan = await planMemory(path, options);
      options = { ...options, ...plan.options };
    }
    const resolved = await resolveModelLoad(path, options);
    // Checked after the options (cheap) and before llama.cpp reads anything.
    if (options.expectedSha256 !== undefined) await verifyModelFile(path, options.expectedSha256);
    // Events can only arrive after submit(), which needs the Model: route through a late-bound handler.
    const route: { handler?: (events: NativeEvent[]) => void } = {};
    let native: NativeModel;
    try {
      const draft = options.draft && 'model' in options.draft ? { draft: Model.#nativeOf(options.draft.model, 'draft.model') } : {};
      native = await binding().loadModel(path, { ...resolved, ...draft }, options.onProgress, (events) => route.handler?.(events));
    } catch (error) {
      throw toGenesisError(error as { code: string; message: string; path?: string });
    }
    const model = new Model(path, native, route);
    model.plan = plan;
    if (options.draft && 'model' in options.draft) {
      model.#draft = options.draft.model;
      options.draft.model.#borrowers.add(model);
    }
    return model;
  }

  /**
   * OML fingerprint check: each key as a raw prompt, greedy, in its own sequence, compared token for
   * token with its response; the share that match against `threshold`, in a signed verdict that
   * carries only a hash of the keys. See verify/fingerprint.ts.
   */
  checkFingerprints(pairs: FingerprintPair[], options?: FingerprintCheckOptions): Promise<FingerprintVerdict> {
    this.#assertOpen();
    return checkFingerprints(this, pairs, options);
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Token ids of `text`. addSpecial adds BOS etc. as the model wants; parseSpecial reads `<|im_start|>`-style text as special tokens. */
  tokenize(text: string, options: { addSpecial?: boolean; parseSpecial?: boolean } = {}): number[] {
    this.#assertOpen();
    if (typeof text !== 'string') throw new InvalidOptionError('text', 'a string', text);
    return Array.from(this.#native.tokenize(text, options.addSpecial ?? true, options.parseSpecial ?? true));
  }

  /**
   * tokenize() off the JS thread, for long documents: the result can go to generate() as tokens.
   */
  async tokenizeAsync(text: string, options: { addSpecial?: boolean; parseSpecial?: boolean } = {}): Promise<number[]> {
    this.#assertOpen();
    if (typeof text !== 'string') throw new InvalidOptionError('text', 'a string', text);
    try {
      return Array.from(await this.#native.tokenizeAsync(text, options.addSpecial ?? true, options.parseSpecial ?? true));
    } catch (error) {
      throw toGenesisError(error as { code: string; message: string });
    }
  }

  detokenize(tokens: readonly number[] | Int32Array, options: { removeSpecial?: boolean; renderSpecial?: boolean } = {}): string {
    this.#assertOpen();
    return this.#native.detokenize(Array.from(tokens), options.removeSpecial ?? false, options.renderSpecial ?? false);
  }

  /** Formats messages with the model's chat template (tokenizer.chat_template) or `template`. */
  applyChatTemplate(messages: ChatMessage[], options: { addAssistant?: boolean; template?: string } = {}): string {
    this.#assertOpen();
    if (!Array.isArray(messages)) throw new InvalidOptionError('messages', 'an array of { role, content }', messages);
    try {
      return this.#native.applyChatTemplate(messages, options.addAssistant ?? true, options.template);
    } catch (error) {
      throw toGenesisError(error as { code: string; message: string });
    }
  }

  /**
   * Starts a generation and returns at once. Iterate it for chunks, await `.result` for the whole.
   * Invalid options, an over-long prompt or a disposed model throw here, synchronously.
   */
  generate(prompt: string | readonly number[] | Int32Array, options: GenerateOptions = {}): Generation {
    this.#assertOpen();
    const sampling = resolveSamplingOptions(options, this.info.vocabSize);
    let tokens: Int32Array;
    if (typeof prompt === 'string') {
      tokens = this.#native.tokenize(prompt, options.addSpecial ?? true, true);
    } else if (prompt instanceof Int32Array || Array.isArray(prompt)) {
      const vocabSize = this.info.vocabSize;
      prompt.forEach((t: unknown, i: number) => {
        if (!Number.isInteger(t) || (t as number) < 0 || (t as number) >= vocabSize) {
          throw new InvalidOptionError(`prompt[${i}]`, `a token id (integer in [0, ${vocabSize}))`, t);
        }
      });
      tokens = Int32Array.from(prompt);
    } else {
      throw new InvalidOptionError('prompt', 'a string or an array of token ids', prompt);
    }
    return this.#submit(tokens, sampling, options.signal);
  }

  /** Non-streaming convenience: the whole result of generate(). */
  async complete(prompt: string | readonly number[] | Int32Array, options: GenerateOptions = {}): Promise<GenerationResult> {
    return this.generate(prompt, options).result;
  }

  /** Generates the assistant's reply to `messages`, formatted with the model's chat template. */
  chat(messages: ChatMessage[], options: ChatOptions = {}): Generation {
    const text = this.applyChatTemplate(messages, { addAssistant: true, template: options.chatTemplate });
    // Templates that spell out the BOS token must not get a second one from the tokenizer.
    const bos = this.#bosPrefix();
    const addSpecial = !(bos.length > 0 && text.startsWith(bos));
    return this.generate(text, { ...options, addSpecial });
  }

  /**
   * Sentence embeddings, L2-normalised, one per input, computed in a context of their own (the
   * batching engine is not disturbed). Pooling is the model's own (mean/CLS for embedding models)
   * or, for generative models without one, the last token.
   */
  async embed(input: string | readonly string[]): Promise<EmbeddingResult> {
    this.#assertOpen();
    const texts = typeof input === 'string' ? [input] : input;
    if (!Array.isArray(texts) || texts.length === 0) throw new InvalidOptionError('input', 'a string or a non-empty array of strings', input);
    const contextSize = this.info.context.contextSize;
    const tokens = texts.map((text, i) => {
      if (typeof text !== 'string') throw new InvalidOptionError(`input[${i}]`, 'a string', text);
      // User text: special-token spellings stay plain text.
      const ids = this.#native.tokenize(text, true, false);
      if (ids.length === 0) throw new InvalidOptionError(`input[${i}]`, 'text that tokenizes to at least one token', text);
      if (ids.length > contextSize) {
        throw new ContextOverflowError(ids.length, contextSize, `input[${i}] has ${ids.length} tokens but the context holds ${contextSize}`);
      }
      return ids;
    });
    try {
      const { embeddings, pooling } = await this.#native.embed(tokens);
      return {
        embeddings: embeddings.map((v) => Array.from(v)),
        pooling,
        promptTokens: tokens.reduce((n, t) => n + t.length, 0),
      };
    } catch (error) {
      throw toGenesisError(error as { code: string; message: string });
    }
  }

  stats(): EngineStats {
    this.#assertOpen();
    return this.#native.stats();
  }

  /**
   * Expert placement of a model loaded with `gpuExperts`: the experts of each layer copied to its
   * device, what the copies take there, and (with expertStats) how many of the layer's expert picks
   * the copies took since they were chosen, up to the step in flight (read between two steps, as
   * expertStats is). InvalidOptionError without gpuExperts.
   */
  async expertPlacement(): Promise<ExpertPlacement> {
    return this.#placement(() => this.#native.expertPlacement());
  }

  /**
   * Chooses the copied experts again (a model loaded with `gpuExperts`), between two steps: the
   * hottest by `heat` (counts such as an earlier run's expertStats()) added to what the model has
   * counted itself (with expertStats). Resolves with the new placement.
   */
  async placeExperts(heat?: ExpertHeat): Promise<ExpertPlacement> {
    const layers = resolveExpertHeat('heat', heat);
    return this.#placement(() => this.#native.placeExperts(layers));
  }

  async #placement(call: () => Promise<{ layers: NativeExpertPlacement[]; error?: string }>): Promise<ExpertPlacement> {
    this.#assertOpen();
    try {
      const { layers, error } = await call();
      return { layers: layers.map(toPlacementLayer), ...(error !== undefined ? { error } : {}) };
    } catch (error) {
      throw toGenesisError(error as { code: string; message: string });
    }
  }

  /**
   * Expert load per MoE layer: how many tokens each expert received since load, counted on the
   * device inside each step and read between two steps (so the promise waits for the step in
   * flight). `reset` zeroes the counters after this read. In most architectures llama.cpp computes
   * the last layer only for the rows whose output is needed, so it counts fewer tokens. Needs the
   * model loaded with `expertStats: true` (InvalidOptionError otherwise).
   */
  async expertStats(options: { reset?: boolean } = {}): Promise<ExpertStats> {
    this.#assertOpen();
    if (!this.info.context.expertStats) {
      throw new InvalidOptionError('expertStats', 'a model loaded with expertStats: true', false);
    }
    let layers: Array<{ layer: number; counts: Float64Array }>;
    try {
      layers = await this.#native.expertStats(options.reset === true);
    } catch (error) {
      throw toGenesisError(error as { code: string; message: string });
    }
    return {
      experts: this.info.experts,
      expertsUsed: this.info.expertsUsed,
      layers: layers.map(({ layer, counts }) => {
        const list = Array.from(counts);
        const total = list.reduce((a, b) => a + b, 0);
        const imbalance = total > 0 ? Math.max(...list) / (total / list.length) : 0;
        return { layer, counts: list, total, imbalance };
      }),
    };
  }

  /**
   * Stops the engine and frees the model. Generations still running reject with DisposedError.
   * Idempotent: later calls return the same promise.
   */
  dispose(): Promise<void> {
    if (this.#disposing) return this.#disposing;
    if (this.#borrowers.size > 0) {
      const users = [...this.#borrowers].map((m) => m.path).join(', ');
      return Promise.reject(new GenesisError('MODEL_IN_USE', `${this.path} is the draft model of ${users}: dispose ${this.#borrowers.size > 1 ? 'those' : 'that one'} first`));
    }
    this.#disposed = true;
    this.#disposing = (async () => {
      await this.#native.close(this.#onEvents);
      for (const generation of this.#active.values()) generation._fail(new DisposedError());
      this.#active.clear();
      if (this.#draft) this.#draft.#borrowers.delete(this);
    })();
    return this.#disposing;
  }

  /** Models loaded with this one as their draft (it is not disposed while they live). */
  #borrowers = new Set<Model>();
  #draft: Model | undefined;

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  #submit(tokens: Int32Array, sampling: NativeSubmitOptions, signal: AbortSignal | undefined): Generation {
    const contextSize = this.info.context.contextSize;
    if (tokens.length >= contextSize) throw new ContextOverflowError(tokens.length, contextSize);
    if (tokens.length === 0) throw new InvalidOptionError('prompt', 'at least one token', 'an empty prompt');
    if (sampling.penaltyLastN === -1) sampling.penaltyLastN = contextSize;

    const id = nextRequestId++;
    let onAbort: (() => void) | undefined;
    const generation = new Generation(
      id,
      sampling.seed,
      () => this.#cancel(id),
      () => {
        this.#active.delete(id);
        if (onAbort) signal?.removeEventListener('abort', onAbort);
      },
    );
    if (signal?.aborted) {
      generation._fail(new AbortError('the signal was aborted before the generation started', { text: '', tokens: [] }));
      return generation;
    }
    try {
      this.#native.submit(id, tokens, sampling);
    } catch (error) {
      throw toGenesisError(error as { code: string; message: string });
    }
    this.#active.set(id, generation);
    if (signal) {
      onAbort = () => this.#cancel(id);
      signal.addEventListener('abort', onAbort, { once: true });
    }
    return generation;
  }

  /**
   * @internal logit fusion: a generation whose tokens are chosen outside (its logits arrive at
   * `_onLogits`, the choice goes back with `_feed`); stop strings, maxTokens and EOS apply as usual.
   */
  _generateExternal(tokens: Int32Array, options: GenerateOptions): Generation {
    this.#assertOpen();
    const sampling = resolveSamplingOptions({ ...options, temperature: 0 }, this.info.vocabSize);
    return this.#submit(tokens, { ...sampling, externalSampling: true, draftMaxTokens: 0 }, options.signal);
  }

  /** @internal */
  _feed(id: number, token: number): void {
    if (!this.#disposed && this.#active.has(id)) this.#native.feed(id, token);
  }

  /** Identifies the tokenizer: equal digests, equal token ids for equal text (logit fusion, drafts). */
  vocabDigest(): string {
    this.#assertOpen();
    return this.#native.vocabDigest();
  }

  #cancel(id: number): void {
    if (!this.#disposed && this.#active.has(id)) this.#native.cancel(id);
  }

  #dispatch(events: NativeEvent[]): void {
    for (const event of events) {
      if (event.kind === 'error' && event.code === 'RPC_DISCONNECTED' && !this.#lost) this.#lost = toGenesisError(event) as RpcError;
      this.#active.get(event.id)?._event(event);
    }
  }

  #lost: RpcError | undefined;

  /**
   * Set once an RPC server holding part of this model was lost: every request then fails with this
   * RpcError (RPC_DISCONNECTED). Dispose the model and load it again once the server is back (a
   * Runtime does that itself when the model's last lease ends).
   */
  get lostDevice(): RpcError | undefined {
    return this.#lost;
  }

  #bosPrefix(): string {
    if (this.#bosText === undefined) {
      const { bos, addBos } = this.info.specialTokens;
      this.#bosText = addBos && bos >= 0 ? this.#native.detokenize([bos], false, true) : '';
    }
    return this.#bosText;
  }

  #assertOpen(): void {
    if (this.#disposed) throw new DisposedError();
  }
}

/** Loads a GGUF model and starts its engine. */
/**
 * Checks `path` with our own strict GGUF reader (llama.cpp may abort the process on some corrupt
 * files) and validates `options` against the model and the build; what loadModel and
 * estimateMemory hand to native code.
 */
export async function resolveModelLoad(path: string, options: LoadModelOptions): Promise<NativeLoadOptions> {
  if (typeof path !== 'string' || path.length === 0) throw new InvalidOptionError('path', 'a path to a .gguf file', path);
  const gguf = await readGguf(path);
  const arch = gguf.metadata.get('general.architecture');
  if (arch?.type !== 'string') {
    throw new ModelLoadError('MODEL_CORRUPT', path, `${path} has no general.architecture string: expected a GGUF model file`);
  }
  checkHyperparameters(gguf, arch.value);
  const ctxTrain = gguf.metadata.get(`${arch.value}.context_length`);
  const system = binding().systemInfo();
  return resolveLoadOptions(options, {
    trainContextLength: ctxTrain && typeof ctxTrain.value === 'number' ? ctxTrain.value : 4096,
    gpuOffload: system.gpuOffload,
    maxSequences: system.maxSequences,
  });
}

export function loadModel(path: string, options?: LoadModelOptions): Promise<Model> {
  return Model._load(path, options);
}

function toPlacementLayer(p: NativeExpertPlacement): ExpertPlacementLayer {
  return { layer: p.layer, experts: Array.from(p.experts), bytes: p.bytes, routed: p.routed, routedToCopies: p.routedToCopies };
}
