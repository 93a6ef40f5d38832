/**
 * The benchmark load generator: percentiles and Poisson arrivals on known values, a real run against
 * our server, and the scheduling and error properties against a tiny node:http SSE stub that counts
 * what it sees. Timings on this shared machine are noisy: only orderings and generous bounds.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mulberry32, percentiles, poissonArrivals, runLoad, type LoadRequest } from '../src/bench/loadgen.js';
import { loadModel, type Model } from '../src/index.js';
import { buildServer, type GenesisServer } from '../src/server/index.js';
import { makeFixtureModel } from './fixtures/models.js';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Total completion tokens of a run, back from tokens/s × s. */
const totalTokens = (s: { outputTokensPerSecond: number; durationSeconds: number }) => s.outputTokensPerSecond * s.durationSeconds;

describe('percentiles', () => {
  it('interpolates linearly between closest ranks', () => {
    const p = percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    expect(p.p50).toBeCloseTo(5.5, 12);
    expect(p.p90).toBeCloseTo(9.1, 12);
    expect(p.p99).toBeCloseTo(9.91, 12);
    expect(p.mean).toBeCloseTo(5.5, 12);
  });

  it('sorts its input without changing it', () => {
    const values = [30, 10, 20];
    const p = percentiles(values);
    expect(values).toEqual([30, 10, 20]);
    expect(p).toEqual({ p50: 20, p90: 28, p99: 29.8, mean: 20 });
  });

  it('gives the value itself for one value, zeros for none', () => {
    expect(percentiles([7])).toEqual({ p50: 7, p90: 7, p99: 7, mean: 7 });
    expect(percentiles([])).toEqual({ p50: 0, p90: 0, p99: 0, mean: 0 });
  });

  it('matches 0..100 exactly at whole percentiles', () => {
    const p = percentiles(Array.from({ length: 101 }, (_, i) => 100 - i));
    expect(p).toEqual({ p50: 50, p90: 90, p99: 99, mean: 50 });
  });
});

describe('poissonArrivals', () => {
  it('is seeded, ascending, starts at 0 and has the asked-for mean rate', () => {
    const a = poissonArrivals(2000, 5, mulberry32(42));
    expect(poissonArrivals(2000, 5, mulberry32(42))).toEqual(a);
    expect(poissonArrivals(2000, 5, mulberry32(43))).not.toEqual(a);
    expect(a).toHaveLength(2000);
    expect(a[0]).toBe(0);
    for (let i = 1; i < a.length; i++) expect(a[i]!).toBeGreaterThanOrEqual(a[i - 1]!);
    const meanGapMs = a.at(-1)! / (a.length - 1);
    expect(meanGapMs).toBeGreaterThan(180); // 200 ms expected; sd of the mean of 1999 gaps ≈ 4.5 ms
    expect(meanGapMs).toBeLessThan(220);
  });

  it('rejects a bad rate or count', () => {
    expect(() => poissonArrivals(3, 0, Math.random)).toThrow(/ratePerSecond/);
    expect(() => poissonArrivals(-1, 1, Math.random)).toThrow(/count/);
    expect(poissonArrivals(0, 1, Math.random)).toEqual([]);
  });
});

describe('runLoad against our server', { timeout: 120_000 }, () => {
  let model: Model;
  let app: GenesisServer;
  let base: string;

  beforeAll(async () => {
    model = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'q8_0' }), { contextSize: 256, maxSequences: 4, threads: 1 });
    app = buildServer({ models: [{ name: 'tiny', model }], host: '127.0.0.1', processMetrics: false });
    await app.listen({ host: '127.0.0.1', port: 0 });
    base = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
  });

  afterAll(async () => {
    await app?.close();
    await model?.dispose();
  });

  it('streams every request to max_tokens and reports consistent latencies', async () => {
    const requests: LoadRequest[] = Array.from({ length: 6 }, (_, i) => ({ prompt: [10 + i, 20, 30, 40 + i], maxTokens: 8 }));
    const progress: Array<[number, number]> = [];
    const stats = await runLoad({ baseUrl: base, model: 'tiny', requests, concurrency: 2, onProgress: (d, t) => progress.push([d, t]) });

    expect(stats.firstError).toBeUndefined();
    expect(stats).toMatchObject({ requests: 6, completed: 6, errors: 0 });
    // ignore_eos and max_tokens 8: each request yields at most 8, so 48 in all means 8 each.
    expect(totalTokens(stats)).toBeCloseTo(48, 6);
    expect(stats.requestsPerSecond * stats.durationSeconds).toBeCloseTo(6, 6);
    expect(progress).toEqual([1, 2, 3, 4, 5, 6].map((d) => [d, 6]));

    expect(stats.ttftMs.p50).toBeGreaterThan(0);
    expect(stats.e2eMs.p50).toBeGreaterThan(0);
    // The tiny model can outrun the client: tokens read in one socket read share a timestamp, so TPOT may be 0.
    expect(stats.tpotMs.p50).toBeGreaterThanOrEqual(0);
    for (const p of [stats.ttftMs, stats.tpotMs, stats.e2eMs]) {
      expect(p.p50).toBeLessThanOrEqual(p.p90);
      expect(p.p90).toBeLessThanOrEqual(p.p99);
    }
    // Each request's TTFT ≤ its e2e, so every order statistic and the mean are ordered too.
    expect(stats.ttftMs.p50).toBeLessThanOrEqual(stats.e2eMs.p50);
    expect(stats.ttftMs.p99).toBeLessThanOrEqual(stats.e2eMs.p99);
    expect(stats.ttftMs.mean).toBeLessThanOrEqual(stats.e2eMs.mean);
    // 7 gaps after the first token fit inside the request.
    expect(stats.tpotMs.mean * 7).toBeLessThanOrEqual(stats.e2eMs.mean);
    expect(stats.durationSeconds * 1000).toBeGreaterThanOrEqual(stats.e2eMs.p99);
  });

  it('counts a server-side rejection (unknown model) as errors with its message', async () => {
    const stats = await runLoad({ baseUrl: base, model: 'nope', requests: [{ prompt: [1, 2], maxTokens: 2 }] });
    expect(stats).toMatchObject({ requests: 1, completed: 0, errors: 1 });
    expect(stats.firstError).toMatch(/^HTTP 404.*nope/);
    expect(stats.ttftMs).toEqual({ p50: 0, p90: 0, p99: 0, mean: 0 });
  });
});

/** What the stub saw of one request. */
interface Seen {
  at: number;
  body: Record<string, unknown>;
  headers: IncomingMessage['headers'];
}

type Behaviour = (req: IncomingMessage, res: ServerResponse, body: Record<string, unknown>) => Promise<void>;

/** A node:http server on port 0 that runs `behaviour` per request and counts requests in flight. */
class Stub {
  server!: Server;
  base = '';
  seen: Seen[] = [];
  inFlight = 0;
  maxInFlight = 0;
  behaviour: Behaviour = async () => {};

  async start(): Promise<void> {
    this.server = createServer(async (req, res) => {
      const at = performance.now();
      this.inFlight++;
      this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
      let text = '';
      for await (const part of req) text += String(part);
      const body = JSON.parse(text) as Record<string, unknown>;
      this.seen.push({ at, body, headers: req.headers });
      try {
        await this.behaviour(req, res, body);
      } finally {
        this.inFlight--; // before the response ends, so a closed loop's next request cannot overlap it here
        if (!res.writableEnded && !res.destroyed) res.end();
      }
    });
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.base = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  reset(behaviour: Behaviour): void {
    this.behaviour = behaviour;
    this.seen = [];
    this.inFlight = 0;
    this.maxInFlight = 0;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

const sse = (data: unknown) => `data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`;
const textChunk = (text: string, finish: string | null = null) => ({ object: 'text_completion', choices: [{ index: 0, text, logprobs: null, finish_reason: finish }] });

/** `tokens` chunks of text 't', each after `gapMs`, then a bare finish chunk, optionally usage, then [DONE]. */
function streamTokens(tokens: number, gapMs: number, usage?: number): Behaviour {
  return async (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    for (let i = 0; i < tokens; i++) {
      await sleep(gapMs);
      res.write(sse(textChunk('t')));
    }
    res.write(sse(textChunk('', 'length')));
    if (usage !== undefined) res.write(sse({ object: 'text_completion', choices: [], usage: { prompt_tokens: 2, completion_tokens: usage, total_tokens: usage + 2 } }));
    res.write(sse('[DONE]'));
  };
}

const requestsOf = (n: number, extra: Partial<LoadRequest> = {}): LoadRequest[] =>
  Array.from({ length: n }, () => ({ prompt: [1, 2], maxTokens: 4, ...extra }));

describe('runLoad against a stub server', { timeout: 60_000 }, () => {
  const stub = new Stub();
  beforeAll(() => stub.start());
  afterAll(() => stub.stop());

  it('sends the documented body and headers', async () => {
    stub.reset(streamTokens(3, 1));
    const stats = await runLoad({
      baseUrl: `${stub.base}/`,
      model: 'm',
      apiKey: 'k-123',
      requests: [{ prompt: [5, 6, 7], maxTokens: 3 }],
      extraBody: { n_probs: 0, temperature: 0.5 },
    });
    expect(stats).toMatchObject({ completed: 1, errors: 0 });
    expect(stub.seen).toHaveLength(1);
    const { body, headers } = stub.seen[0]!;
    expect(body).toEqual({
      model: 'm',
      prompt: [5, 6, 7],
      max_tokens: 3,
      temperature: 0.5,
      stream: true,
      stream_options: { include_usage: true },
      ignore_eos: true,
      n_probs: 0,
    });
    expect(headers['authorization']).toBe('Bearer k-123');
  });

  it('counts content chunks when no usage arrives, and prefers usage when it does', async () => {
    stub.reset(streamTokens(5, 1));
    const counted = await runLoad({ baseUrl: stub.base, requests: requestsOf(2) });
    expect(counted).toMatchObject({ completed: 2, errors: 0 });
    expect(totalTokens(counted)).toBeCloseTo(10, 6); // the bare finish chunk is not a token

    stub.reset(streamTokens(5, 1, 9));
    const reported = await runLoad({ baseUrl: stub.base, requests: requestsOf(2) });
    expect(totalTokens(reported)).toBeCloseTo(18, 6);
  });

  it("reads llama-server's shape: empty-text token chunks, finish chunk with usage, CRLF, pings, split bytes", async () => {
    stub.reset(async (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body =
        ':\r\n\r\n' + // SSE ping comment
        sse(textChunk('')).replace(/\n/g, '\r\n') + // token held back (stop-string prefix)
        sse(textChunk('a€')) +
        sse(textChunk('b')) +
        sse({ ...textChunk('', 'length'), usage: { completion_tokens: 4, prompt_tokens: 2, total_tokens: 6 } }) +
        sse('[DONE]');
      const bytes = Buffer.from(body);
      for (let i = 0; i < bytes.length; i += 7) {
        res.write(bytes.subarray(i, i + 7)); // splits lines, events and the 3-byte '€'
        await sleep(1);
      }
    });
    const stats = await runLoad({ baseUrl: stub.base, requests: requestsOf(1) });
    expect(stats.firstError).toBeUndefined();
    expect(totalTokens(stats)).toBeCloseTo(4, 6);
    expect(stats.ttftMs.p50).toBeLessThanOrEqual(stats.e2eMs.p50);
  });

  it('keeps at most `concurrency` requests in flight in a closed loop, and reaches it', async () => {
    stub.reset(streamTokens(3, 50));
    const stats = await runLoad({ baseUrl: stub.base, requests: requestsOf(12), concurrency: 3 });
    expect(stats).toMatchObject({ completed: 12, errors: 0 });
    expect(stub.seen).toHaveLength(12);
    expect(stub.maxInFlight).toBe(3);
  });

  it('sends open-loop arrivals at their times, regardless of requests still running', async () => {
    stub.reset(streamTokens(2, 1000)); // each request runs ≥ 2 s
    const at = [0, 250, 500, 750];
    const t0 = performance.now();
    const stats = await runLoad({ baseUrl: stub.base, requests: at.map((a) => ({ prompt: [1], maxTokens: 2, at: a })) });
    expect(stats).toMatchObject({ completed: 4, errors: 0 });
    const offsets = stub.seen.map((s) => s.at - t0).sort((a, b) => a - b);
    offsets.forEach((offset, i) => {
      expect(offset).toBeGreaterThanOrEqual(at[i]! - 5);
      expect(offset).toBeLessThan(at[i]! + 600);
    });
    expect(stub.maxInFlight).toBe(4); // the last was sent while the first still ran
  });

  it('caps open-loop requests in flight only when concurrency is given', async () => {
    stub.reset(streamTokens(1, 300));
    const capped = await runLoad({ baseUrl: stub.base, requests: requestsOf(6, { at: 0 }), concurrency: 2 });
    expect(capped).toMatchObject({ completed: 6, errors: 0 });
    expect(stub.maxInFlight).toBe(2);

    // No cap: 32 simultaneous streams, so the fetch client does not limit connections per origin.
    stub.reset(streamTokens(1, 1500));
    const open = await runLoad({ baseUrl: stub.base, requests: requestsOf(32, { at: 0 }) });
    expect(open).toMatchObject({ completed: 32, errors: 0 });
    expect(stub.maxInFlight).toBe(32);
  });

  it('counts HTTP errors, streams cut before [DONE], error events and timeouts, keeping the first message', async () => {
    stub.reset(async (_req, res) => {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.write(JSON.stringify({ error: { message: 'boom: out of slots' } }));
    });
    const http = await runLoad({ baseUrl: stub.base, requests: requestsOf(3), concurrency: 3 });
    expect(http).toMatchObject({ requests: 3, completed: 0, errors: 3, outputTokensPerSecond: 0 });
    expect(http.firstError).toMatch(/^HTTP 500: .*boom: out of slots/);

    let n = 0;
    stub.reset(async (req, res) => {
      if (n++ % 2 === 0) return streamTokens(2, 1)(req, res, {});
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(sse(textChunk('x')) + sse(textChunk('y')));
      // ends without [DONE]
    });
    const cut = await runLoad({ baseUrl: stub.base, requests: requestsOf(4), concurrency: 1 });
    expect(cut).toMatchObject({ requests: 4, completed: 2, errors: 2 });
    expect(cut.firstError).toBe('stream ended before [DONE] after 2 tokens');
    expect(totalTokens(cut)).toBeCloseTo(4, 6); // completed requests only

    stub.reset(async (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(sse(textChunk('x')));
      res.socket?.destroy(); // connection reset mid-stream
    });
    const reset = await runLoad({ baseUrl: stub.base, requests: requestsOf(1) });
    expect(reset).toMatchObject({ completed: 0, errors: 1 });
    expect(reset.firstError).toBeTruthy();

    stub.reset(async (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(sse(textChunk('x')) + sse({ error: { message: 'decode failed', type: 'server_error' } }));
    });
    const event = await runLoad({ baseUrl: stub.base, requests: requestsOf(1) });
    expect(event).toMatchObject({ completed: 0, errors: 1, firstError: 'error event in stream: decode failed' });

    stub.reset(async (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      await sleep(3000);
    });
    const slow = await runLoad({ baseUrl: stub.base, requests: requestsOf(1), timeoutMs: 200 });
    expect(slow).toMatchObject({ completed: 0, errors: 1, firstError: 'timed out after 200 ms' });
  });

  it('counts an unreachable server as errors', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    const stats = await runLoad({ baseUrl: `http://127.0.0.1:${port}`, requests: requestsOf(2), concurrency: 2 });
    expect(stats).toMatchObject({ requests: 2, completed: 0, errors: 2 });
    expect(stats.firstError).toMatch(/ECONNREFUSED/);
  });

  it('rejects bad options instead of counting them', async () => {
    await expect(runLoad({ baseUrl: stub.base, requests: requestsOf(1), concurrency: 0 })).rejects.toThrow(/concurrency/);
    await expect(runLoad({ baseUrl: stub.base, requests: [{ prompt: [], maxTokens: 1 }] })).rejects.toThrow(/requests\[0\]\.prompt/);
    await expect(runLoad({ baseUrl: stub.base, requests: [{ prompt: [1], maxTokens: 1, at: -1 }] })).rejects.toThrow(/requests\[0\]\.at/);
  });
});
