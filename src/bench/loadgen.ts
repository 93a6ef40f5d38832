/**
 * The load generator the benchmark harness runs, with identical code, against our server and
 * against llama.cpp's llama-server: streamed POST /v1/completions with token-id prompts, closed-loop
 * (fixed concurrency) or open-loop (requests sent at given arrival times), timed on the client.
 *
 * Token counting. Both servers report `usage.completion_tokens` in a final stream chunk, and that
 * count is what this module uses whenever it arrives; content chunks are only a fallback, because
 * neither server sends exactly one chunk per token:
 * - Ours (src/server/routes/completions.ts) sends usage only when asked with
 *   `stream_options: { include_usage: true }` (sent here). Its text chunks carry no token ids and are
 *   not one per token: chunks with empty text (a token ending inside a UTF-8 character, or held back
 *   while a stop string may still match) are dropped (ChoiceGroup.events), and a consumer that falls
 *   behind gets its backlog merged into one chunk (Generation.#emit). Each choice then ends with a
 *   chunk of text '' and a finish_reason, which is not a token.
 * - llama-server (tools/server/server-context.cpp, process_token) sends one partial chunk per token,
 *   with text '' for a token held back by a possible stop-string match, but no chunk at all for a
 *   token that leaves an incomplete UTF-8 character (its bytes go out with the next token). Its
 *   final /v1/completions chunk has text '', a finish_reason and `usage` whatever include_usage says.
 * So the fallback count is "chunks whose choices[0].text is a string, except a bare finish chunk
 * (text '' with a finish_reason) and llama-server's prompt_progress chunks"; it is exact for
 * llama-server on ASCII text and a lower bound otherwise.
 *
 * Times are taken when a socket read delivers the bytes: events that arrive in one read share a
 * timestamp, so a server faster than the client's event loop shows a TPOT near 0.
 *
 * Connections: node:http with a fresh connection per request and no per-origin limit, so
 * connection reuse never caps concurrency (the tests check 32 simultaneous streams) and no request
 * is sent on a keep-alive connection the server is closing (cpp-httplib in llama-server closes
 * idle ones; fetch then fails with "other side closed"). Connecting over loopback costs well under
 * a millisecond, the same for both servers.
 */
import { Agent, request as httpRequest } from 'node:http';

import { mulberry32 } from '../synthetic/models.js';
import type { LoadStats, Percentiles } from './types.js';

export { mulberry32 };

/**
 * p50/p90/p99 by linear interpolation between closest ranks (numpy's default: the p-th percentile
 * of sorted v is v[h] interpolated at h = (n - 1) · p / 100), and the arithmetic mean. Empty input
 * gives all zeros (JSON has no NaN); look at the request counts to tell "none" from "zero".
 */
export function percentiles(values: number[]): Percentiles {
  if (values.length === 0) return { p50: 0, p90: 0, p99: 0, mean: 0 };
  const sorted = [...values].sort((a, b) => a - b);
  const at = (p: number): number => {
    const h = ((sorted.length - 1) * p) / 100;
    const lo = Math.floor(h);
    const hi = Math.min(lo + 1, sorted.length - 1);
    return sorted[lo]! + (h - lo) * (sorted[hi]! - sorted[lo]!);
  };
  return { p50: at(50), p90: at(90), p99: at(99), mean: sorted.reduce((s, v) => s + v, 0) / sorted.length };
}

export interface LoadRequest {
  /** Token ids (both servers accept `prompt` as an array of ids). */
  prompt: number[];
  maxTokens: number;
  /** ms after start; open-loop arrival */
  at?: number;
}

export interface LoadOptions {
  /** Server root, e.g. http://127.0.0.1:8080 (no /v1). */
  baseUrl: string;
  /** Sent as `model` if given. Our server requires it; llama-server ignores it. */
  model?: string;
  requests: LoadRequest[];
  /**
   * Most requests in flight at once. Without any `at`: closed loop, the next request starts when one
   * ends (default 1). With `at` on any request: open loop, and this only caps in-flight requests
   * (default: no cap); a request that finds the cap full waits and is timed from when it is sent.
   */
  concurrency?: number;
  /** Sent as `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Per request, send to end of stream, in ms (default 600 000). */
  timeoutMs?: number;
  /** Merged last into every request body (e.g. llama-server options); may override the defaults. */
  extraBody?: Record<string, unknown>;
  /** Called after each request ends, successfully or not. */
  onProgress?: (done: number, total: number) => void;
}

/** One request's client-side timeline, in performance.now() ms. */
interface RequestRecord {
  sendMs: number;
  endMs: number;
  /** First and last chunk that carried a token. */
  firstTokenMs?: number;
  lastTokenMs?: number;
  tokens: number;
  error?: string;
}

const DEFAULT_TIMEOUT_MS = 600_000;
/** How much of an error body to keep in the message. */
const ERROR_BODY_CHARS = 300;

const NO_KEEP_ALIVE = new Agent({ keepAlive: false, maxSockets: Infinity });

/**
 * Runs `requests` against `baseUrl` and summarizes them. Request failures (HTTP status other than
 * 200, network error, timeout, an error event in the stream, a stream that ends without [DONE]) are
 * counted in `errors`, never thrown; bad options throw. Latency figures and token throughput come
 * from completed requests only; the duration runs from the first send to the last end of any request.
 */
export async function runLoad(options: LoadOptions): Promise<LoadStats> {
  const { requests } = options;
  validate(options);
  const total = requests.length;
  const openLoop = requests.some((r) => r.at !== undefined);
  const concurrency = options.concurrency ?? (openLoop ? Infinity : 1);
  const records: RequestRecord[] = new Array(total);
  let done = 0;
  const finish = (index: number, record: RequestRecord) => {
    records[index] = record;
    done++;
    options.onProgress?.(done, total);
  };

  if (!openLoop) {
    let next = 0;
    const worker = async () => {
      while (next < total) {
        const index = next++;
        finish(index, await sendOne(options, requests[index]!));
      }
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, total) }, worker));
  } else {
    const slots = new Slots(concurrency);
    const start = performance.now();
    await Promise.all(
      requests.map(async (request, index) => {
        const wait = start + (request.at ?? 0) - performance.now();
        if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
        await slots.acquire();
        try {
          finish(index, await sendOne(options, request));
        } finally {
          slots.release();
        }
      }),
    );
  }
  return summarize(records);
}

function validate(options: LoadOptions): void {
  const { concurrency, timeoutMs, requests } = options;
  if (!Array.isArray(requests)) throw new TypeError('runLoad: requests must be an array of { prompt, maxTokens, at? }.');
  if (concurrency !== undefined && !(Number.isInteger(concurrency) && concurrency >= 1)) {
    throw new RangeError(`runLoad: concurrency must be an integer ≥ 1, got ${String(concurrency)}.`);
  }
  if (timeoutMs !== undefined && !(timeoutMs > 0)) throw new RangeError(`runLoad: timeoutMs must be > 0, got ${String(timeoutMs)}.`);
  requests.forEach((r, i) => {
    if (!Array.isArray(r.prompt) || r.prompt.length === 0 || !r.prompt.every((t) => Number.isInteger(t) && t >= 0)) {
      throw new TypeError(`runLoad: requests[${i}].prompt must be a non-empty array of token ids.`);
    }
    if (!(Number.isInteger(r.maxTokens) && r.maxTokens >= 1)) {
      throw new RangeError(`runLoad: requests[${i}].maxTokens must be an integer ≥ 1, got ${String(r.maxTokens)}.`);
    }
    if (r.at !== undefined && !(Number.isFinite(r.at) && r.at >= 0)) {
      throw new RangeError(`runLoad: requests[${i}].at must be a finite number of ms ≥ 0, got ${String(r.at)}.`);
    }
  });
}

/** A counting semaphore, first come first served. */
class Slots {
  #free: number;
  #waiting: Array<() => void> = [];

  constructor(size: number) {
    this.#free = size;
  }

  acquire(): Promise<void> {
    if (this.#free > 0) {
      this.#free--;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  release(): void {
    const next = this.#waiting.shift();
    if (next) next();
    else this.#free++;
  }
}

function summarize(records: RequestRecord[]): LoadStats {
  const ok = records.filter((r) => r.error === undefined);
  const firstError = records.find((r) => r.error !== undefined)?.error;
  const durationMs = records.length > 0 ? Math.max(...records.map((r) => r.endMs)) - Math.min(...records.map((r) => r.sendMs)) : 0;
  const durationSeconds = durationMs / 1000;
  const tokens = ok.reduce((s, r) => s + r.tokens, 0);
  const ttft: number[] = [];
  const tpot: number[] = [];
  for (const r of ok) {
    if (r.firstTokenMs === undefined || r.lastTokenMs === undefined) continue;
    ttft.push(r.firstTokenMs - r.sendMs);
    if (r.tokens >= 2) tpot.push((r.lastTokenMs - r.firstTokenMs) / (r.tokens - 1));
  }
  return {
    requests: records.length,
    completed: ok.length,
    errors: records.length - ok.length,
    ...(firstError !== undefined ? { firstError } : {}),
    durationSeconds,
    outputTokensPerSecond: durationSeconds > 0 ? tokens / durationSeconds : 0,
    requestsPerSecond: durationSeconds > 0 ? ok.length / durationSeconds : 0,
    ttftMs: percentiles(ttft),
    tpotMs: percentiles(tpot),
    e2eMs: percentiles(ok.map((r) => r.endMs - r.sendMs)),
  };
}

/** Sends one streamed completion and times it; never throws. */
async function sendOne(options: LoadOptions, request: LoadRequest): Promise<RequestRecord> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const body = {
    ...(options.model !== undefined ? { model: options.model } : {}),
    prompt: request.prompt,
    max_tokens: request.maxTokens,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
    ignore_eos: true,
    ...options.extraBody,
  };
  const headers: Record<string, string> = { 'content-type': 'application/json', accept: 'text/event-stream' };
  if (options.apiKey !== undefined) headers['authorization'] = `Bearer ${options.apiKey}`;
  const url = `${options.baseUrl.replace(/\/+$/, '')}/v1/completions`;

  const stream = new StreamState();
  const sendMs = performance.now();
  let endMs: number | undefined;
  const record = (error?: string): RequestRecord => ({
    sendMs,
    endMs: endMs ?? performance.now(),
    tokens: stream.tokens(),
    ...(stream.firstTokenMs !== undefined ? { firstTokenMs: stream.firstTokenMs, lastTokenMs: stream.lastTokenMs } : {}),
    ...(error !== undefined ? { error } : {}),
  });
  return new Promise<RequestRecord>((resolve) => {
    let settled = false;
    const finish = (error?: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      req.destroy();
      resolve(record(error));
    };
    const timer = setTimeout(() => finish(`timed out after ${timeoutMs} ms`), timeoutMs);
    const payload = JSON.stringify(body);
    // A connection per request: no keep-alive race with a server closing an idle connection
    // (llama-server's cpp-httplib does), and the same cost on both servers.
    const req = httpRequest(url, { method: 'POST', agent: NO_KEEP_ALIVE, headers: { ...headers, 'content-length': Buffer.byteLength(payload) } }, (response) => {
      const decoder = new TextDecoder();
      if (response.statusCode !== 200) {
        let text = '';
        response.on('data', (d: Buffer) => (text += decoder.decode(d, { stream: true })));
        response.on('end', () => finish(`HTTP ${response.statusCode}${text ? `: ${text.slice(0, ERROR_BODY_CHARS)}` : ''}`));
        return;
      }
      response.on('data', (d: Buffer) => {
        const now = performance.now();
        stream.feed(decoder.decode(d, { stream: true }), now);
        if (stream.error !== undefined) return finish(stream.error);
        if (stream.sawDone && endMs === undefined) endMs = now;
      });
      response.on('end', () => {
        stream.feed(decoder.decode() + '\n\n', performance.now()); // an event the body ended without a blank line after
        if (stream.error !== undefined) return finish(stream.error);
        if (stream.sawDone) return finish();
        finish(`stream ended before [DONE] after ${stream.tokens()} tokens`);
      });
      response.on('error', (error) => finish(stream.sawDone ? undefined : describeError(error)));
    });
    req.on('error', (error) => finish(stream.sawDone ? undefined : describeError(error)));
    req.end(payload);
  });
}

/** "connect ECONNREFUSED 127.0.0.1:1", with the cause where there is one. */
function describeError(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = (error as { cause?: unknown }).cause;
  return cause instanceof Error ? `${error.message}: ${cause.message}` : error.message;
}

/** Incremental SSE parsing (data: lines, events at blank lines) and the per-token bookkeeping. */
class StreamState {
  sawDone = false;
  error: string | undefined;
  firstTokenMs: number | undefined;
  lastTokenMs: number | undefined;
  #chunks = 0;
  #usage: number | undefined;
  #buffer = '';
  #data: string[] = [];

  /** Completion tokens: the server's usage count if it sent one, else the counted content chunks. */
  tokens(): number {
    return this.#usage ?? this.#chunks;
  }

  feed(text: string, now: number): void {
    this.#buffer += text;
    const lines = this.#buffer.split(/\r\n|\r|\n/);
    this.#buffer = lines.pop()!; // an unterminated line waits for more bytes
    for (const line of lines) {
      if (this.sawDone || this.error !== undefined) return;
      if (line === '') {
        this.#dispatch(now);
      } else if (line.startsWith('data:')) {
        this.#data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
      } // comments (':' pings), event:, id:, retry: carry nothing we time
    }
  }

  #dispatch(now: number): void {
    if (this.#data.length === 0) return;
    const data = this.#data.join('\n');
    this.#data = [];
    if (data.trim() === '[DONE]') {
      this.sawDone = true;
      return;
    }
    let event: StreamChunk;
    try {
      event = JSON.parse(data) as StreamChunk;
    } catch {
      this.error = `malformed SSE data: ${data.slice(0, ERROR_BODY_CHARS)}`;
      return;
    }
    if (event === null || typeof event !== 'object') return;
    if (event.error !== undefined && event.error !== null) {
      const message = typeof event.error === 'object' ? event.error.message : undefined;
      this.error = `error event in stream: ${typeof message === 'string' ? message : JSON.stringify(event.error)}`;
      return;
    }
    const completionTokens = event.usage?.completion_tokens;
    if (typeof completionTokens === 'number') this.#usage = completionTokens;
    const choice = Array.isArray(event.choices) ? event.choices[0] : undefined;
    if (!choice || typeof choice.text !== 'string' || event.prompt_progress !== undefined) return;
    const bareFinish = choice.text === '' && choice.finish_reason !== null && choice.finish_reason !== undefined;
    if (bareFinish) return;
    this.#chunks++;
    this.firstTokenMs ??= now;
    this.lastTokenMs = now;
  }
}

/** The parts of a /v1/completions stream chunk (ours or llama-server's) read here. */
interface StreamChunk {
  choices?: Array<{ text?: unknown; finish_reason?: unknown }>;
  usage?: { completion_tokens?: unknown } | null;
  error?: { message?: unknown } | string | null;
  prompt_progress?: unknown;
}

/**
 * Arrival offsets (ms, ascending) of `count` requests from a Poisson process of `ratePerSecond`:
 * exponential gaps drawn from `random` (e.g. mulberry32(seed)), the first request at 0 so that the
 * run does not start idle.
 */
export function poissonArrivals(count: number, ratePerSecond: number, random: () => number): number[] {
  if (!(Number.isInteger(count) && count >= 0)) throw new RangeError(`poissonArrivals: count must be an integer ≥ 0, got ${count}.`);
  if (!(Number.isFinite(ratePerSecond) && ratePerSecond > 0)) {
    throw new RangeError(`poissonArrivals: ratePerSecond must be a finite number > 0, got ${ratePerSecond}.`);
  }
  const out: number[] = [];
  let t = 0;
  for (let i = 0; i < count; i++) {
    if (i > 0) t += (-Math.log(1 - random()) / ratePerSecond) * 1000; // random() ∈ [0, 1) keeps log finite
    out.push(t);
  }
  return out;
}
