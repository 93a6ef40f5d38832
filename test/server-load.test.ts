/**
 * Bounded loopback load test: a few hundred concurrent streaming requests against one server, a
 * seeded share of them disconnecting at random points (before the response, or after a few chunks).
 * Every completed response must be whole and well-formed, every disconnect must free its sequence,
 * and memory must come back to its baseline. Traffic goes to 127.0.0.1 only; the request count and
 * every wait are bounded.
 */
import { runInNewContext } from 'node:vm';
import { setFlagsFromString } from 'node:v8';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Model } from '../src/index.js';
import { buildServer, type GenesisServer } from '../src/server/index.js';
import { mulberry32 } from '../src/synthetic/models.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

const REQUESTS = 300;
/** A first round of the same size allocates what 300 concurrent sockets need (buffers, pools, JIT). */
const WARMUP = REQUESTS;
const DISCONNECT_SHARE = 0.35;
const LONG = 2000; // max_tokens of requests that will disconnect: a leaked one would run for seconds
/**
 * Memory after the measured round, against the baseline after an equal warm-up round, both after
 * forced GCs. Measured on the 2-core dev machine (three runs): RSS 147.6 -> 144.0, 139.0 -> 142.9,
 * 140.4 -> 145.5 MiB (-3.6 to +5.1 MiB); V8 heap +0.3 MiB each time (20.9 -> 21.3 MiB). Twelve
 * more rounds (3600 requests) moved RSS within ±3 MiB and the heap by under 1 MiB in all. The bounds
 * are generous (RSS depends on the allocator and on what else runs); the heap bound still catches
 * a leak of 20 KiB a request (a retained response, socket or generation with its text) in this
 * one round, and the per-request checks below catch leaked sequences directly.
 */
const RSS_BOUND_MB = 32;
const HEAP_BOUND_MB = 6;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

async function settle(): Promise<{ rss: number; heap: number }> {
  for (let i = 0; i < 3; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 50));
  }
  const m = process.memoryUsage();
  return { rss: m.rss / 2 ** 20, heap: m.heapUsed / 2 ** 20 };
}

async function waitFor(check: () => boolean, ms: number): Promise<boolean> {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    if (check()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return check();
}

type Plan =
  | { kind: 'complete'; endpoint: 'chat' | 'completions'; prompt: number; maxTokens: number; usage: boolean }
  | { kind: 'disconnect'; endpoint: 'chat' | 'completions'; prompt: number; after: number; delayMs: number };

const PROMPTS = ['The weather today', 'Tell me a story about a fox', 'List three colours'];

describe('server under load', { timeout: 120_000 }, () => {
  let model: Model;
  let app: GenesisServer;
  let base: string;
  /** Greedy solo output per endpoint, prompt and max_tokens: what every whole response must equal. */
  const expected = new Map<string, string>();

  beforeAll(async () => {
    // Each response is compared with the same prompt run alone: CPU (fixtures/gpu.ts).
    model = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'q8_0' }), { contextSize: 2048, maxSequences: 8, threads: 1, ...BATCH_INVARIANT });
    app = buildServer({ models: [{ name: 'm', model }], maxTokensLimit: LONG, processMetrics: false });
    await app.listen({ host: '127.0.0.1', port: 0 });
    base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
    for (const [p, prompt] of PROMPTS.entries()) {
      const completion = await model.complete(prompt, { temperature: 0, maxTokens: 12 });
      const chat = await model.chat([{ role: 'user', content: prompt }], { temperature: 0, maxTokens: 12 }).result;
      for (let m = 1; m <= 12; m++) {
        // Text of the first m tokens, as the stream would release it (no stop strings here).
        expected.set(`completions/${p}/${m}`, (await model.complete(prompt, { temperature: 0, maxTokens: m })).text);
        expected.set(`chat/${p}/${m}`, (await model.chat([{ role: 'user', content: prompt }], { temperature: 0, maxTokens: m }).result).text);
      }
      expect(expected.get(`completions/${p}/12`)).toBe(completion.text);
      expect(expected.get(`chat/${p}/12`)).toBe(chat.text);
    }
  });

  afterAll(async () => {
    await app?.close();
    await model?.dispose();
  });

  function plans(count: number, seed: number): Plan[] {
    const rng = mulberry32(seed);
    return Array.from({ length: count }, (): Plan => {
      const endpoint = rng() < 0.5 ? 'chat' : 'completions';
      const prompt = Math.floor(rng() * PROMPTS.length);
      if (rng() < DISCONNECT_SHARE) {
        // after 0: abort while the request is in flight, before any chunk (often before headers)
        return { kind: 'disconnect', endpoint, prompt, after: Math.floor(rng() * 4), delayMs: Math.floor(rng() * 20) };
      }
      return { kind: 'complete', endpoint, prompt, maxTokens: 1 + Math.floor(rng() * 12), usage: rng() < 0.5 };
    });
  }

  async function run(plan: Plan): Promise<'whole' | 'disconnected'> {
    const path = plan.endpoint === 'chat' ? '/v1/chat/completions' : '/v1/completions';
    const text = PROMPTS[plan.prompt]!;
    const body: Record<string, unknown> = { model: 'm', stream: true, temperature: 0 };
    if (plan.endpoint === 'chat') body['messages'] = [{ role: 'user', content: text }];
    else body['prompt'] = text;
    if (plan.kind === 'complete') {
      body['max_tokens'] = plan.maxTokens;
      if (plan.usage) body['stream_options'] = { include_usage: true };
    } else {
      body['max_tokens'] = LONG;
      body['ignore_eos'] = true;
    }
    const controller = new AbortController();
    const response = fetch(`${base}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (plan.kind === 'disconnect' && plan.after === 0) {
      setTimeout(() => controller.abort(), plan.delayMs);
      await response.then((r) => r.body?.cancel()).catch(() => undefined);
      return 'disconnected';
    }
    const res = await response;
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    const events: string[] = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut: number;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        expect(event.startsWith('data: '), event).toBe(true);
        events.push(event.slice(6));
      }
      if (plan.kind === 'disconnect' && events.length >= plan.after) {
        controller.abort();
        await reader.cancel().catch(() => undefined);
        return 'disconnected';
      }
    }
    // Whole and well-formed: JSON chunks of one id, one finish_reason, [DONE] last, nothing after it.
    expect(buffer).toBe('');
    expect(events.at(-1)).toBe('[DONE]');
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as Record<string, any>);
    expect(new Set(chunks.map((c) => c['id'])).size).toBe(1);
    expect(chunks.every((c) => c['object'] === (plan.endpoint === 'chat' ? 'chat.completion.chunk' : 'text_completion'))).toBe(true);
    const choiceChunks = chunks.filter((c) => c['choices'].length > 0);
    const finishes = choiceChunks.map((c) => c['choices'][0].finish_reason).filter((f) => f !== null);
    expect(finishes).toEqual(['length']);
    expect(choiceChunks.at(-1)!['choices'][0].finish_reason).toBe('length');
    const content = choiceChunks.map((c) => (plan.endpoint === 'chat' ? (c['choices'][0].delta.content ?? '') : c['choices'][0].text)).join('');
    if (plan.kind === 'complete') {
      expect(content).toBe(expected.get(`${plan.endpoint}/${plan.prompt}/${plan.maxTokens}`));
      if (plan.usage) expect(chunks.at(-1)!['usage']).toMatchObject({ completion_tokens: plan.maxTokens });
    }
    return 'whole';
  }

  async function round(count: number, seed: number): Promise<{ whole: number; disconnected: number; seconds: number }> {
    const started = performance.now();
    const outcomes = await Promise.all(plans(count, seed).map(run));
    // Every disconnect frees its sequence: nothing may still run or wait. A leaked 2000-token
    // generation would keep a sequence busy for seconds, far past this bound.
    const freed = await waitFor(() => model.stats().active === 0 && model.stats().queued === 0, 3000);
    expect(freed, JSON.stringify(model.stats())).toBe(true);
    return {
      whole: outcomes.filter((o) => o === 'whole').length,
      disconnected: outcomes.filter((o) => o === 'disconnected').length,
      seconds: (performance.now() - started) / 1000,
    };
  }

  it(`${REQUESTS} concurrent streams with random disconnects: whole responses, freed sequences, memory back to baseline`, async () => {
    await round(WARMUP, 1);
    const before = await settle();
    const stepsBefore = model.stats().decodedTokens;
    const result = await round(REQUESTS, 0x5eed);
    const after = await settle();

    expect(result.whole + result.disconnected).toBe(REQUESTS);
    expect(result.disconnected).toBeGreaterThan(REQUESTS * DISCONNECT_SHARE * 0.6);
    expect(result.whole).toBeGreaterThan(REQUESTS * (1 - DISCONNECT_SHARE) * 0.6);
    // Disconnected 2000-token requests really stopped: far fewer tokens than if they had run on.
    const decoded = model.stats().decodedTokens - stepsBefore;
    expect(decoded).toBeLessThan(result.disconnected * 200);
    // The server is idle again: no request still counted in flight except this scrape.
    const metrics = await (await fetch(`${base}/metrics`)).text();
    expect(metrics).toMatch(/^genesis_http_requests_in_flight 1$/m);
    const rssGrowth = after.rss - before.rss;
    const heapGrowth = after.heap - before.heap;
    console.log(
      `load: ${REQUESTS} requests in ${result.seconds.toFixed(2)} s, ${result.whole} whole, ${result.disconnected} disconnected; ` +
        `${decoded} tokens decoded; RSS ${before.rss.toFixed(1)} -> ${after.rss.toFixed(1)} MiB (${rssGrowth >= 0 ? '+' : ''}${rssGrowth.toFixed(1)}), ` +
        `heap ${before.heap.toFixed(1)} -> ${after.heap.toFixed(1)} MiB (${heapGrowth >= 0 ? '+' : ''}${heapGrowth.toFixed(1)})`,
    );
    expect(rssGrowth).toBeLessThan(RSS_BOUND_MB);
    expect(heapGrowth).toBeLessThan(HEAP_BOUND_MB);
  });
});
