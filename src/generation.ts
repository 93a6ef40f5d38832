/**
 * One request's stream: an async iterator over chunks plus a `result` promise. The engine pushes
 * coalesced events here from the native thread (through one ThreadSafeFunction per model); a
 * consumer that reads slowly only makes chunks accumulate, it never slows the engine down.
 */
import type { NativeEvent } from './binding.js';
import { AbortError, toGenesisError } from './errors.js';

export type FinishReason = 'eog' | 'stop' | 'length' | 'context';

export interface GenerationChunk {
  /** Text released by this chunk: never splits a UTF-8 character, never contains a stop string. */
  text: string;
  /** Token ids sampled since the previous chunk (text may lag tokens while a stop string could still match). */
  tokens: number[];
}

export interface GenerationTimings {
  /** Waiting for a free sequence slot. */
  queuedMs: number;
  /** Prompt processing: admitted to first token. */
  promptMs: number;
  /** First token to the end. */
  generationMs: number;
  /** Submit to first token. */
  timeToFirstTokenMs: number;
  /** Prompt tokens per second of prefill. */
  promptTokensPerSecond: number;
  /** Generated tokens per second after the first. */
  tokensPerSecond: number;
}

export interface GenerationResult {
  text: string;
  tokens: number[];
  /**
   * 'eog': the model produced an end-of-generation token; 'stop': a stop string matched;
   * 'length': maxTokens reached; 'context': the sequence's context is full.
   */
  finishReason: FinishReason;
  usage: { promptTokens: number; completionTokens: number };
  timings: GenerationTimings;
  /** The sampler seed used: pass it back to reproduce the output. */
  seed: number;
  /**
   * Speculative decoding (a model loaded with `draft`): tokens the draft proposed, how many the
   * model kept, and the share kept. Each kept token is one target decode step saved.
   */
  speculative?: { draftTokens: number; acceptedTokens: number; acceptanceRate: number };
  /**
   * kvBudget: times this request was preempted for room in the shared KV pool and recomputed
   * later (its output is unchanged; its time grew). Absent when never.
   */
  preemptions?: number;
}

type Waiter = { resolve: (r: IteratorResult<GenerationChunk>) => void; reject: (e: unknown) => void };

export class Generation implements AsyncIterable<GenerationChunk> {
  /** Resolves with the whole output; rejects with AbortError, DisposedError or another GenesisError. */
  readonly result: Promise<GenerationResult>;
  readonly id: number;
  readonly seed: number;

  #chunks: GenerationChunk[] = [];
  #waiters: Waiter[] = [];
  #done = false;
  #error: unknown;
  #text = '';
  #tokens: number[] = [];
  #resolve!: (r: GenerationResult) => void;
  #reject!: (e: unknown) => void;
  #onSettle: (() => void) | undefined;
  #cancel: () => void;

  /** @internal created by Model */
  constructor(id: number, seed: number, cancel: () => void, onSettle?: () => void) {
    this.id = id;
    this.seed = seed;
    this.#cancel = cancel;
    this.#onSettle = onSettle;
    this.result = new Promise<GenerationResult>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    // Consumers may only iterate; an aborted run must not become an unhandled rejection.
    this.result.catch(() => {});
  }

  /** @internal logit fusion: called with each step's logits of an externally sampled generation */
  _onLogits: ((logits: Float32Array) => void) | undefined;

  /** @internal */
  _event(event: NativeEvent): void {
    if (this.#done) return;
    if (event.kind === 'logits') {
      this._onLogits?.(event.logits);
      return;
    }
    const tokens = Array.from(event.tokens);
    this.#text += event.text;
    this.#tokens.push(...tokens);
    if (event.text.length > 0 || tokens.length > 0) this.#emit({ text: event.text, tokens });
    if (event.kind === 'tokens') return;
    if (event.kind === 'error') {
      const error = toGenesisError({ code: event.code, message: event.message });
      this._fail(error);
      return;
    }
    if (event.finishReason === 'abort') {
      this._fail(new AbortError('the generation was aborted', { text: this.#text, tokens: this.#tokens }));
      return;
    }
    const t = event.timings;
    const completion = event.completionTokens;
    const result: GenerationResult = {
      text: this.#text,
      tokens: this.#tokens,
      finishReason: event.finishReason,
      usage: { promptTokens: event.promptTokens, completionTokens: completion },
      timings: {
        ...t,
        promptTokensPerSecond: t.promptMs > 0 ? (event.promptTokens / t.promptMs) * 1000 : 0,
        tokensPerSecond: t.generationMs > 0 && completion > 1 ? ((completion - 1) / t.generationMs) * 1000 : 0,
      },
      seed: this.seed,
      ...(event.draftTokens > 0
        ? { speculative: { draftTokens: event.draftTokens, acceptedTokens: event.draftAccepted, acceptanceRate: event.draftAccepted / event.draftTokens } }
        : {}),
      ...(event.preemptions > 0 ? { preemptions: event.preemptions } : {}),
    };
    this.#finish();
    this.#resolve(result);
  }

  /** @internal */
  _fail(error: unknown): void {
    if (this.#done) return;
    this.#error = error;
    this.#finish();
    this.#reject(error);
  }

  #emit(chunk: GenerationChunk): void {
    const waiter = this.#waiters.shift();
    if (waiter) {
      waiter.resolve({ value: chunk, done: false });
      return;
    }
    // A consumer that fell behind gets the backlog as one chunk, not one per engine step.
    const last = this.#chunks.at(-1);
    if (last) {
      last.text += chunk.text;
      last.tokens.push(...chunk.tokens);
    } else {
      this.#chunks.push(chunk);
    }
  }

  #finish(): void {
    this.#done = true;
    this.#onSettle?.();
    this.#onSettle = undefined;
    // Waiters only exist while no chunk is buffered, so they all see the end now.
    for (const waiter of this.#waiters.splice(0)) {
      if (this.#error !== undefined) waiter.reject(this.#error);
      else waiter.resolve({ value: undefined, done: true });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<GenerationChunk> {
    return {
      next: () => {
        const chunk = this.#chunks.shift();
        if (chunk) return Promise.resolve({ value: chunk, done: false });
        if (this.#done) {
          return this.#error !== undefined ? Promise.reject(this.#error) : Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
      },
      // Leaving a for-await loop early cancels the generation and frees its sequence.
      return: () => {
        if (!this.#done) this.#cancel();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}
