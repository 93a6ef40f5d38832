/**
 * The OpenAI-compatible server, driven by the official `openai` client (and fetch where the client
 * hides what is checked): chat and completions, streaming and not, sampling parameters, errors in
 * OpenAI's shape, auth, limits, client disconnects, metrics.
 */
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Model } from '../src/index.js';
import { buildServer, type GenesisServer } from '../src/server/index.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

/** One decode thread: this is a shared 2-core machine and vitest runs two files at once. */
const THREADS = 1;
const API_KEY = 'test-key-0123456789';
const MAX_TOKENS_LIMIT = 2000;
const BODY_LIMIT = 64 * 1024;

/** Polls `check` every 10 ms until it holds, for at most `ms`. */
async function waitFor(check: () => boolean, ms = 5000): Promise<boolean> {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    if (check()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return check();
}

/** Prometheus text → { 'name{labels}': value } (labels as written by prom-client). */
function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.trim() === '') continue;
    const cut = line.lastIndexOf(' ');
    out.set(line.slice(0, cut), Number(line.slice(cut + 1)));
  }
  return out;
}

function metric(metrics: Map<string, number>, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const [key, value] of metrics) {
    const brace = key.indexOf('{');
    const keyName = brace < 0 ? key : key.slice(0, brace);
    if (keyName !== name) continue;
    if (Object.entries(labels).every(([k, v]) => key.includes(`${k}="${v}"`))) sum += value;
  }
  return sum;
}

describe('OpenAI-compatible server', { timeout: 60_000 }, () => {
  let tiny: Model; // 4 sequences, context 256
  let single: Model; // 1 sequence, 1 queued request at most, context 2048: for queue and abort tests
  let app: GenesisServer;
  let keyed: GenesisServer; // the same models behind an API key
  let base: string;
  let client: OpenAI;

  beforeAll(async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    // Seeded replies are compared across requests that ran in different batches: CPU (fixtures/gpu.ts).
    tiny = await loadModel(path, { contextSize: 256, maxSequences: 4, threads: THREADS, ...BATCH_INVARIANT });
    single = await loadModel(path, { contextSize: 2048, maxSequences: 1, maxQueue: 1, threads: THREADS, ...BATCH_INVARIANT });
    const models = [
      { name: 'tiny', model: tiny },
      { name: 'single', model: single, randomWeights: true },
    ];
    app = buildServer({ models, host: '127.0.0.1', bodyLimit: BODY_LIMIT, maxTokensLimit: MAX_TOKENS_LIMIT, processMetrics: false });
    await app.listen({ host: '127.0.0.1', port: 0 });
    base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
    client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 30_000 });
    keyed = buildServer({ models, host: '127.0.0.1', apiKey: API_KEY, processMetrics: false });
    await keyed.listen({ host: '127.0.0.1', port: 0 });
  });

  afterAll(async () => {
    await app?.close();
    await keyed?.close();
    await tiny?.dispose();
    await single?.dispose();
  });

  const messages: OpenAI.ChatCompletionMessageParam[] = [
    { role: 'system', content: 'You are terse.' },
    { role: 'user', content: 'Name a colour.' },
  ];

  describe('chat completions', () => {
    it('non-streaming: the greedy reply of model.chat, with usage and a mapped finish_reason', async () => {
      const expected = await tiny.chat(messages as never, { temperature: 0, maxTokens: 12 }).result;
      const r = await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_tokens: 12 });
      expect(r.object).toBe('chat.completion');
      expect(r.id).toMatch(/^chatcmpl-/);
      expect(r.model).toBe('tiny');
      expect(r.choices).toHaveLength(1);
      expect(r.choices[0]!.message).toMatchObject({ role: 'assistant', content: expected.text });
      expect(r.choices[0]!.finish_reason).toBe(expected.finishReason === 'length' ? 'length' : 'stop');
      expect(r.usage).toEqual({ prompt_tokens: expected.usage.promptTokens, completion_tokens: expected.usage.completionTokens, total_tokens: expected.usage.promptTokens + expected.usage.completionTokens });
      // max_completion_tokens is the newer name of max_tokens
      const r2 = await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_completion_tokens: 12 });
      expect(r2.choices[0]!.message.content).toBe(expected.text);
    });

    it('streaming: role first, deltas that add up to the non-streamed text, finish_reason, usage chunk last', async () => {
      const whole = await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_tokens: 16 });
      const stream = await client.chat.completions.create({
        model: 'tiny',
        messages,
        temperature: 0,
        max_tokens: 16,
        stream: true,
        stream_options: { include_usage: true },
      });
      const chunks: OpenAI.ChatCompletionChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);
      expect(chunks[0]!.choices[0]!.delta.role).toBe('assistant');
      expect(chunks.every((c) => c.object === 'chat.completion.chunk' && c.id === chunks[0]!.id)).toBe(true);
      const text = chunks.map((c) => c.choices[0]?.delta.content ?? '').join('');
      expect(text).toBe(whole.choices[0]!.message.content);
      const finishes = chunks.filter((c) => c.choices[0]?.finish_reason);
      expect(finishes).toHaveLength(1);
      expect(finishes[0]!.choices[0]!.finish_reason).toBe(whole.choices[0]!.finish_reason);
      const last = chunks.at(-1)!;
      expect(last.choices).toEqual([]);
      expect(last.usage).toEqual(whole.usage);
      // Without include_usage there is no usage chunk.
      const plain = await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_tokens: 4, stream: true });
      const plainChunks: OpenAI.ChatCompletionChunk[] = [];
      for await (const chunk of plain) plainChunks.push(chunk);
      expect(plainChunks.every((c) => c.choices.length === 1 && !c.usage)).toBe(true);
    });

    it('n > 1: n choices with their index; with a seed each choice differs and the whole reply reproduces', async () => {
      const request = { model: 'tiny', messages, temperature: 1.2, top_p: 1, seed: 1234, max_tokens: 10, n: 3 } as const;
      const a = await client.chat.completions.create(request);
      const b = await client.chat.completions.create(request);
      expect(a.choices.map((c) => c.index)).toEqual([0, 1, 2]);
      expect(a.choices.map((c) => c.message.content)).toEqual(b.choices.map((c) => c.message.content));
      expect(new Set(a.choices.map((c) => c.message.content)).size).toBe(3);
      expect(a.usage!.completion_tokens).toBe(30);

      const stream = await client.chat.completions.create({ ...request, stream: true });
      const texts = ['', '', ''];
      const finishes: Array<string | null> = [null, null, null];
      for await (const chunk of stream) {
        for (const choice of chunk.choices) {
          texts[choice.index] += choice.delta.content ?? '';
          if (choice.finish_reason) finishes[choice.index] = choice.finish_reason;
        }
      }
      expect(texts).toEqual(a.choices.map((c) => c.message.content));
      expect(finishes).toEqual(['length', 'length', 'length']);
    });

    it('seed: the same seed reproduces a sampled reply, another seed changes it', async () => {
      const ask = (seed: number) =>
        client.chat.completions.create({ model: 'tiny', messages, temperature: 1.0, top_p: 1, seed, max_tokens: 16 }).then((r) => r.choices[0]!.message.content);
      const first = await ask(42);
      expect(await ask(42)).toBe(first);
      expect(await ask(43)).not.toBe(first);
    });

    it('presence and frequency penalties are accepted and change greedy output', async () => {
      const plain = await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_tokens: 40 });
      const penalised = await client.chat.completions.create({
        model: 'tiny',
        messages,
        temperature: 0,
        max_tokens: 40,
        presence_penalty: 2,
        frequency_penalty: 2,
      });
      expect(penalised.choices[0]!.message.content).not.toBe(plain.choices[0]!.message.content);
    });
  });

  describe('completions', () => {
    it('non-streaming and streaming give the greedy text of model.complete', async () => {
      const expected = await tiny.complete('Once upon a time', { temperature: 0, maxTokens: 12 });
      const r = await client.completions.create({ model: 'tiny', prompt: 'Once upon a time', temperature: 0, max_tokens: 12 });
      expect(r.object).toBe('text_completion');
      expect(r.choices[0]!.text).toBe(expected.text);
      expect(r.choices[0]!.finish_reason).toBe('length');
      expect(r.usage).toMatchObject({ prompt_tokens: expected.usage.promptTokens, completion_tokens: 12 });

      const stream = await client.completions.create({
        model: 'tiny',
        prompt: 'Once upon a time',
        temperature: 0,
        max_tokens: 12,
        stream: true,
        stream_options: { include_usage: true },
      });
      let text = '';
      let finish: string | null = null;
      let usage: OpenAI.CompletionUsage | undefined | null;
      for await (const chunk of stream) {
        text += chunk.choices[0]?.text ?? '';
        finish = chunk.choices[0]?.finish_reason ?? finish;
        if (chunk.usage) usage = chunk.usage;
      }
      expect(text).toBe(expected.text);
      expect(finish).toBe('length');
      expect(usage).toEqual(r.usage);
    });

    it('several prompts and token-id prompts: choices numbered prompt × n + i', async () => {
      const ids = tiny.tokenize('The sky is');
      const r = await client.completions.create({ model: 'tiny', prompt: ['The sky is', 'Water is'], temperature: 0, max_tokens: 6, n: 2 });
      expect(r.choices.map((c) => c.index)).toEqual([0, 1, 2, 3]);
      expect(r.choices[0]!.text).toBe(r.choices[1]!.text); // greedy: the same prompt gives the same text
      expect(r.choices[0]!.text).not.toBe(r.choices[2]!.text);
      const byIds = await client.completions.create({ model: 'tiny', prompt: ids, temperature: 0, max_tokens: 6 });
      expect(byIds.choices[0]!.text).toBe(r.choices[0]!.text);
      const echo = await client.completions.create({ model: 'tiny', prompt: 'The sky is', temperature: 0, max_tokens: 6, echo: true });
      expect(echo.choices[0]!.text).toBe(`The sky is${r.choices[0]!.text}`);
    });

    it('stop: a string or a list; the text ends before the stop string and finish_reason is stop', async () => {
      const whole = (await client.completions.create({ model: 'tiny', prompt: 'Stop here', temperature: 0, max_tokens: 24 })).choices[0]!.text;
      expect(whole.length).toBeGreaterThan(12);
      const stop = whole.slice(8, 12);
      const expected = whole.slice(0, whole.indexOf(stop));
      const one = await client.completions.create({ model: 'tiny', prompt: 'Stop here', temperature: 0, max_tokens: 24, stop });
      expect(one.choices[0]).toMatchObject({ text: expected, finish_reason: 'stop' });
      const list = await client.completions.create({ model: 'tiny', prompt: 'Stop here', temperature: 0, max_tokens: 24, stop: ['never-in-the-output', stop] });
      expect(list.choices[0]).toMatchObject({ text: expected, finish_reason: 'stop' });
      const chat = await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_tokens: 24 });
      const chatText = chat.choices[0]!.message.content!;
      const chatStop = chatText.slice(6, 9);
      const stopped = await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_tokens: 24, stop: chatStop, stream: true });
      let streamed = '';
      let finish: string | null = null;
      for await (const chunk of stopped) {
        streamed += chunk.choices[0]?.delta.content ?? '';
        finish = chunk.choices[0]?.finish_reason ?? finish;
      }
      expect(streamed).toBe(chatText.slice(0, chatText.indexOf(chatStop)));
      expect(finish).toBe('stop');
    });

    it('logit_bias: +100 forces a token, -100 bans the greedy choice', async () => {
      const [token] = tiny.tokenize('apple', { addSpecial: false });
      const forced = await client.completions.create({
        model: 'tiny',
        prompt: 'Fruit:',
        temperature: 0,
        max_tokens: 5,
        logit_bias: { [String(token)]: 100 },
      });
      // (the tokenizer drops the leading space of a text's first token; the stream keeps it)
      expect(forced.choices[0]!.text.trim()).toBe(tiny.detokenize(new Array(5).fill(token!)).trim());
      const greedy = await tiny.complete('Fruit:', { temperature: 0, maxTokens: 1 });
      const banned = await client.completions.create({
        model: 'tiny',
        prompt: 'Fruit:',
        temperature: 0,
        max_tokens: 1,
        logit_bias: { [String(greedy.tokens[0])]: -100 },
      });
      expect(banned.choices[0]!.text).not.toBe(greedy.text);
    });
  });

  describe('response_format', () => {
    const schema = {
      type: 'object',
      properties: {
        answer: { type: 'string', enum: ['yes', 'no'] },
        confidence: { type: 'integer', minimum: 0, maximum: 100 },
        tags: { type: 'array', items: { type: 'string', maxLength: 8 }, maxItems: 3 },
      },
      required: ['answer', 'confidence', 'tags'],
      additionalProperties: false,
    };

    function checkAnswer(text: string | null | undefined): void {
      const value = JSON.parse(text ?? '') as { answer: string; confidence: number; tags: string[] };
      expect(Object.keys(value)).toEqual(['answer', 'confidence', 'tags']);
      expect(['yes', 'no']).toContain(value.answer);
      expect(Number.isInteger(value.confidence) && value.confidence >= 0 && value.confidence <= 100).toBe(true);
      expect(value.tags.length).toBeLessThanOrEqual(3);
      for (const tag of value.tags) expect(typeof tag === 'string' && [...tag].length <= 8).toBe(true);
    }

    it('json_schema: every sampled choice parses and follows the schema', async () => {
      const r = await client.chat.completions.create({
        model: 'tiny',
        messages: [{ role: 'user', content: 'Answer in JSON' }],
        temperature: 1.0,
        seed: 7,
        n: 4,
        max_tokens: 200,
        response_format: { type: 'json_schema', json_schema: { name: 'answer', schema, strict: true } },
      });
      expect(r.choices).toHaveLength(4);
      for (const choice of r.choices) {
        expect(choice.finish_reason).toBe('stop');
        checkAnswer(choice.message.content);
      }
      // Streamed too, on /v1/completions.
      const stream = await client.completions.create({
        model: 'tiny',
        prompt: 'JSON:',
        temperature: 0.8,
        seed: 3,
        max_tokens: 200,
        stream: true,
        response_format: { type: 'json_schema', json_schema: { name: 'answer', schema } },
      } as never);
      let text = '';
      for await (const chunk of stream as unknown as AsyncIterable<OpenAI.Completion>) text += chunk.choices[0]?.text ?? '';
      checkAnswer(text);
    });

    it('json_object: output is a JSON object; an unsupported schema is a 400 naming response_format', async () => {
      const r = await client.chat.completions.create({
        model: 'tiny',
        messages: [{ role: 'user', content: 'JSON object please' }],
        temperature: 0,
        max_tokens: 200,
        response_format: { type: 'json_object' },
      });
      const text = r.choices[0]!.message.content!;
      expect(text.startsWith('{')).toBe(true);
      // With random weights a string may run to max_tokens; a finished reply must parse.
      if (r.choices[0]!.finish_reason === 'stop') expect(JSON.parse(text)).toBeTypeOf('object');
      const e = (await client.chat.completions
        .create({
          model: 'tiny',
          messages,
          response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'string', format: 'email' } } },
        })
        .then(
          () => undefined,
          (error: unknown) => error,
        )) as InstanceType<typeof OpenAI.APIError>;
      expect(e).toBeInstanceOf(OpenAI.APIError);
      expect([e.status, e.code]).toEqual([400, 'unsupported_schema']);
      expect(e.param).toMatch(/^response_format/);
      expect(e.message).toMatch(/format/);
    });
  });

  describe('embeddings', () => {
    it('one unit vector per input, through the client (base64) and as floats', async () => {
      const r = await client.embeddings.create({ model: 'tiny', input: ['hello world', 'goodbye'] });
      expect(r.object).toBe('list');
      expect(r.data.map((d) => d.index)).toEqual([0, 1]);
      const direct = await tiny.embed(['hello world', 'goodbye']);
      for (const [i, d] of r.data.entries()) {
        expect(d.embedding).toHaveLength(tiny.info.embeddingLength);
        const norm = Math.hypot(...d.embedding);
        expect(norm).toBeCloseTo(1, 4);
        d.embedding.forEach((x, j) => expect(x).toBeCloseTo(direct.embeddings[i]![j]!, 5));
      }
      expect(r.usage.prompt_tokens).toBe(direct.promptTokens);
      const floats = await client.embeddings.create({ model: 'tiny', input: 'hello world', encoding_format: 'float' });
      expect(floats.data[0]!.embedding).toHaveLength(tiny.info.embeddingLength);
    });
  });

  describe('models and health', () => {
    it('GET /v1/models lists every model with its metadata; retrieve one', async () => {
      const list = await client.models.list();
      const data = list.data as Array<OpenAI.Model & { meta: Record<string, unknown> }>;
      expect(data.map((m) => m.id)).toEqual(['tiny', 'single']);
      for (const m of data) {
        expect(m.object).toBe('model');
        expect(m.owned_by).toBe('genesis');
        expect(m.created).toBeGreaterThan(1_600_000_000);
        expect(m.meta).toMatchObject({ architecture: 'llama', state: 'ready' });
      }
      expect(data[0]!.meta).toMatchObject({ context: 256, random_weights: false });
      expect(data[1]!.meta).toMatchObject({ context: 2048, random_weights: true });
      expect((await client.models.retrieve('single')).id).toBe('single');
    });

    it('GET /health reports each engine', async () => {
      const r = await fetch(`${base}/health`);
      expect(r.status).toBe(200);
      const body = (await r.json()) as { status: string; models: Array<{ id: string; state: string; active: number }> };
      expect(body.status).toBe('ok');
      expect(body.models.map((m) => [m.id, m.state])).toEqual([['tiny', 'ready'], ['single', 'ready']]);
    });

    it('GET / serves the self-contained chat page', async () => {
      const r = await fetch(`${base}/`);
      expect(r.status).toBe(200);
      expect(r.headers.get('content-type')).toMatch(/^text\/html/);
      expect(r.headers.get('content-security-policy')).toMatch(/connect-src 'self'/);
      const html = await r.text();
      expect(html).toContain('/v1/chat/completions');
      expect(html).toContain('random weights');
      expect(html).not.toMatch(/(src|href)=["']?https?:/); // no CDN, nothing external
    });
  });

  describe('errors in OpenAI shape', () => {
    async function failure(run: () => Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
      const error = await run().then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(OpenAI.APIError);
      return error as InstanceType<typeof OpenAI.APIError>;
    }

    it('unknown model: 404 model_not_found', async () => {
      const e = await failure(() => client.chat.completions.create({ model: 'nope', messages }));
      expect(e.status).toBe(404);
      expect(e.code).toBe('model_not_found');
      expect(e.param).toBe('model');
      expect(e.type).toBe('invalid_request_error');
      expect(e.message).toMatch(/nope.*tiny, single/);
    });

    it('bad parameters: 400 invalid_request_error naming the parameter', async () => {
      const cases: Array<[Record<string, unknown>, string]> = [
        [{ temperature: 3 }, 'temperature'],
        [{ top_p: 1.5 }, 'top_p'],
        [{ max_tokens: 0 }, 'max_tokens'],
        [{ max_tokens: MAX_TOKENS_LIMIT + 1 }, 'max_tokens'],
        [{ max_completion_tokens: 1.5 }, 'max_completion_tokens'],
        [{ n: 0 }, 'n'],
        [{ n: 99 }, 'n'],
        [{ stop: [''] }, 'stop'],
        [{ logit_bias: { abc: 1 } }, 'logit_bias'],
        [{ logit_bias: { '999999': 1 } }, 'logit_bias'],
        [{ presence_penalty: -3 }, 'presence_penalty'],
        [{ seed: 'x' }, 'seed'],
        [{ response_format: { type: 'xml' } }, 'response_format'],
        [{ messages: [] }, 'messages'],
        [{ messages: [{ role: 'wizard', content: 'hi' }] }, 'messages[0].role'],
        [{ logprobs: true }, 'logprobs'],
        [{ stream_options: { include_usage: true } }, 'stream_options'],
      ];
      for (const [params, param] of cases) {
        const e = await failure(() => client.chat.completions.create({ model: 'tiny', messages, max_tokens: 4, ...params } as never));
        expect([e.status, e.param, e.type], JSON.stringify(params)).toEqual([400, param, 'invalid_request_error']);
        expect(e.message.length).toBeGreaterThan(10);
      }
      const missing = await failure(() => client.completions.create({ model: 'tiny' } as never));
      expect([missing.status, missing.param]).toEqual([400, 'prompt']);
      const badJson = await fetch(`${base}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"model":' });
      expect(badJson.status).toBe(400);
      expect(((await badJson.json()) as { error: { type: string } }).error.type).toBe('invalid_request_error');
      const unknownRoute = await fetch(`${base}/v1/nothing`);
      expect(unknownRoute.status).toBe(404);
      expect(await unknownRoute.json()).toMatchObject({ error: { type: 'invalid_request_error', code: 'unknown_url' } });
    });

    it('a prompt longer than the context: 400 context_length_exceeded with the runtime message', async () => {
      const long = 'word '.repeat(400);
      const e = await failure(() => client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: long }], max_tokens: 4 }));
      expect(e.status).toBe(400);
      expect(e.code).toBe('context_length_exceeded');
      expect(e.param).toBe('messages');
      expect(e.message).toMatch(/prompt has \d+ tokens but the context holds 256 tokens per sequence/);
      const c = await failure(() => client.completions.create({ model: 'tiny', prompt: long, max_tokens: 4 }));
      expect([c.status, c.param, c.code]).toEqual([400, 'prompt', 'context_length_exceeded']);
      expect(tiny.stats().active).toBe(0);
    });

    it('queue full: 429 with Retry-After, and accepted again once there is room', async () => {
      const controller = new AbortController();
      // Occupies single's only sequence until aborted.
      const running = await client.completions.create(
        { model: 'single', prompt: 'long', max_tokens: MAX_TOKENS_LIMIT, ignore_eos: true, stream: true } as never,
        { signal: controller.signal },
      );
      const iterator = (running as unknown as AsyncIterable<unknown>)[Symbol.asyncIterator]();
      await iterator.next();
      const queued = client.completions.create({ model: 'single', prompt: 'queued', max_tokens: 2 }); // fills the queue (maxQueue 1)
      expect(await waitFor(() => single.stats().queued === 1)).toBe(true);
      const e = await failure(() => client.completions.create({ model: 'single', prompt: 'one too many', max_tokens: 2 }));
      expect(e.status).toBe(429);
      expect(e.type).toBe('rate_limit_error');
      expect(e.code).toBe('queue_full');
      expect(e.headers?.get('retry-after')).toBe('1');
      const stream = await failure(() => client.completions.create({ model: 'single', prompt: 'also too many', max_tokens: 2, stream: true }));
      expect(stream.status).toBe(429);
      controller.abort();
      expect((await queued).choices[0]!.finish_reason).toBe('length');
      expect((await client.completions.create({ model: 'single', prompt: 'room now', max_tokens: 2 })).usage!.completion_tokens).toBe(2);
    });

    it('API key: 401 when missing or wrong, 200 with it; the page and /health stay open', async () => {
      const keyedBase = `http://127.0.0.1:${(keyed.server.address() as { port: number }).port}`;
      const wrong = new OpenAI({ baseURL: `${keyedBase}/v1`, apiKey: 'wrong-key', maxRetries: 0 });
      const e = await failure(() => wrong.models.list());
      expect([e.status, e.code, e.type]).toEqual([401, 'invalid_api_key', 'authentication_error']);
      const none = await fetch(`${keyedBase}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'tiny', messages }),
      });
      expect(none.status).toBe(401);
      expect(none.headers.get('www-authenticate')).toMatch(/^Bearer/);
      expect(await none.json()).toMatchObject({ error: { code: 'missing_api_key', type: 'authentication_error', param: null } });
      expect((await fetch(`${keyedBase}/metrics`)).status).toBe(401);
      expect((await fetch(`${keyedBase}/health`)).status).toBe(200);
      expect((await fetch(`${keyedBase}/`)).status).toBe(200);
      const right = new OpenAI({ baseURL: `${keyedBase}/v1`, apiKey: API_KEY, maxRetries: 0 });
      const r = await right.chat.completions.create({ model: 'tiny', messages, max_tokens: 2 });
      expect(r.choices[0]!.message.content).toBeTypeOf('string');
      expect(() => buildServer({ models: [{ name: 'tiny', model: tiny }], host: '0.0.0.0' })).toThrow(/without an API key/);
    });

    it('a body over the limit: 413 in OpenAI shape', async () => {
      const e = await failure(() => client.completions.create({ model: 'tiny', prompt: 'x'.repeat(BODY_LIMIT + 10), max_tokens: 2 }));
      expect(e.status).toBe(413);
      expect(e.type).toBe('invalid_request_error');
      expect(e.code).toBe('request_too_large');
    });
  });

  describe('client disconnects', () => {
    it('aborting a stream (openai client AbortController) frees the sequence at once', async () => {
      const controller = new AbortController();
      const stream = await client.chat.completions.create(
        { model: 'single', messages, max_tokens: MAX_TOKENS_LIMIT, ignore_eos: true, stream: true } as never,
        { signal: controller.signal },
      );
      let chunks = 0;
      // The client's stream ends quietly when its own signal aborts it (after chunks it had already read).
      for await (const _chunk of stream as unknown as AsyncIterable<unknown>) {
        if (++chunks === 3) controller.abort();
      }
      expect(chunks).toBeGreaterThanOrEqual(3);
      expect(chunks).toBeLessThan(MAX_TOKENS_LIMIT / 2);
      // ~2000 tokens would take seconds: the sequence must be freed long before.
      expect(await waitFor(() => single.stats().active === 0 && single.stats().queued === 0, 2000)).toBe(true);
    });

    it('a non-streaming request whose client goes away is cancelled too, even while queued', async () => {
      const blocker = new AbortController();
      const waiting = new AbortController();
      const post = (signal: AbortSignal) =>
        fetch(`${base}/v1/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: 'single', prompt: 'x', max_tokens: MAX_TOKENS_LIMIT, ignore_eos: true }),
          signal,
        }).catch((e: unknown) => e);
      const first = post(blocker.signal);
      expect(await waitFor(() => single.stats().active === 1)).toBe(true);
      const second = post(waiting.signal);
      expect(await waitFor(() => single.stats().queued === 1)).toBe(true);
      waiting.abort(); // the queued one first
      expect(await waitFor(() => single.stats().queued === 0, 2000)).toBe(true);
      expect(single.stats().active).toBe(1);
      blocker.abort();
      expect(await waitFor(() => single.stats().active === 0, 2000)).toBe(true);
      expect(await first).toBeInstanceOf(Error);
      expect(await second).toBeInstanceOf(Error);
    });
  });

  describe('metrics', () => {
    it('counters move with requests; gauges come from the engines', async () => {
      const before = parseMetrics(await (await fetch(`${base}/metrics`)).text());
      await client.chat.completions.create({ model: 'tiny', messages, temperature: 0, max_tokens: 5 });
      const stream = await client.completions.create({ model: 'tiny', prompt: 'Hi', temperature: 0, max_tokens: 7, stream: true });
      for await (const _chunk of stream) void _chunk;
      await client.completions.create({ model: 'nope', prompt: 'Hi' }).catch(() => undefined);
      const r = await fetch(`${base}/metrics`);
      expect(r.headers.get('content-type')).toMatch(/^text\/plain/);
      const text = await r.text();
      for (const name of [
        'genesis_http_requests_total',
        'genesis_prompt_tokens_total',
        'genesis_completion_tokens_total',
        'genesis_time_to_first_token_seconds',
        'genesis_time_per_output_token_seconds',
        'genesis_queue_depth',
        'genesis_active_sequences',
        'genesis_kv_used_tokens',
        'genesis_kv_capacity_tokens',
      ]) {
        expect(text).toContain(`# TYPE ${name} `);
      }
      const after = parseMetrics(text);
      const delta = (name: string, labels: Record<string, string> = {}) => metric(after, name, labels) - metric(before, name, labels);
      expect(delta('genesis_http_requests_total', { endpoint: '/v1/chat/completions', status: '200' })).toBe(1);
      expect(delta('genesis_http_requests_total', { endpoint: '/v1/completions', status: '200' })).toBe(1);
      expect(delta('genesis_http_requests_total', { endpoint: '/v1/completions', status: '404' })).toBe(1);
      expect(delta('genesis_completion_tokens_total', { model: 'tiny' })).toBe(12);
      expect(delta('genesis_prompt_tokens_total', { model: 'tiny' })).toBeGreaterThan(0);
      expect(delta('genesis_time_to_first_token_seconds_count', { model: 'tiny' })).toBe(2);
      expect(delta('genesis_time_per_output_token_seconds_count', { model: 'tiny' })).toBe(4 + 6);
      expect(metric(after, 'genesis_kv_capacity_tokens', { model: 'tiny' })).toBe(256 * 4);
      expect(metric(after, 'genesis_kv_capacity_tokens', { model: 'single' })).toBe(2048);
      expect(metric(after, 'genesis_active_sequences', { model: 'tiny' })).toBe(0);
      // Engine time by phase moved with the two generations; decoding and sampling are parts of steps.
      const seconds = (phase: string) => delta('genesis_engine_seconds_total', { model: 'tiny', phase });
      for (const phase of ['step', 'decode', 'sample']) expect(seconds(phase)).toBeGreaterThan(0);
      expect(seconds('wait')).toBeGreaterThanOrEqual(0);
      expect(seconds('decode') + seconds('sample')).toBeLessThan(seconds('step'));
      expect(metric(after, 'genesis_queue_depth', { model: 'single' })).toBe(0);
      // The disconnect tests above ended generations by abort, and their requests count as 499.
      expect(metric(after, 'genesis_generations_total', { model: 'single', finish_reason: 'abort' })).toBeGreaterThanOrEqual(3);
      expect(metric(after, 'genesis_http_requests_total', { status: '499' })).toBeGreaterThanOrEqual(3);
    });
  });
});
