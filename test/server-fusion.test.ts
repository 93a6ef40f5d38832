/**
 * Fused virtual models in the server (buildServer's `fused`, `genesis serve --fuse`): listed with
 * their members, generating through both generating routes (streamed and not), refusing what
 * logit fusion cannot apply with a 400 naming the parameter, counted under their own name in
 * /metrics, and bad declarations refused before serving.
 */
import { spawnSync } from 'node:child_process';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { estimateMemory, loadModel, type Model } from '../src/index.js';
import { buildServer, ServerConfigError, type GenesisServer } from '../src/server/index.js';
import { serve } from '../src/server/serve.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

// Seeded fused sampling is compared across requests run in different batches: CPU (fixtures/gpu.ts).
const load = { contextSize: 256, maxSequences: 4, batchSize: 64, threads: 1, ...BATCH_INVARIANT };
const FUSED = [
  // Weights (1, 0): the first member alone, token for token.
  { name: 'first', members: [{ model: 'a', weight: 1 }, { model: 'b', weight: 0 }] },
  { name: 'duo', members: [{ model: 'a', weight: 0.7 }, { model: 'b', weight: 0.3 }] },
];

interface Completion {
  model: string;
  choices: Array<{ text: string; finish_reason: string }>;
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
}

describe('fused models in the server', { timeout: 120_000 }, () => {
  let a: Model;
  let b: Model;
  let aPath: string;
  let bPath: string;
  let otherPath: string;
  let app: GenesisServer;
  let base: string;
  let client: OpenAI;

  const post = (path: string, body: unknown) =>
    fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const complete = async (body: Record<string, unknown>): Promise<Completion> => {
    const r = await post('/v1/completions', body);
    expect(r.status, await r.clone().text()).toBe(200);
    return (await r.json()) as Completion;
  };

  beforeAll(async () => {
    aPath = await makeFixtureModel({ arch: 'llama', type: 'q8_0', nLayer: 2 });
    bPath = await makeFixtureModel({ arch: 'llama', type: 'q8_0', nLayer: 2, seed: 9 });
    otherPath = await makeFixtureModel({ arch: 'qwen3moe' });
    a = await loadModel(aPath, load);
    b = await loadModel(bPath, load);
    app = buildServer({ models: [{ name: 'a', model: a }, { name: 'b', model: b }], fused: FUSED, processMetrics: false });
    await app.listen({ host: '127.0.0.1', port: 0 });
    base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
    client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });
  });
  afterAll(async () => {
    await app?.close();
    await a?.dispose();
    await b?.dispose();
  });

  it('lists the fused models after the served ones, with members and weights', async () => {
    const list = await client.models.list();
    expect(list.data.map((m) => m.id)).toEqual(['a', 'b', 'first', 'duo']);
    const duo = (await (await fetch(`${base}/v1/models/duo`)).json()) as { id: string; meta: Record<string, unknown> };
    expect(duo.id).toBe('duo');
    expect(duo.meta['fusion']).toEqual({ members: [{ model: 'a', weight: 0.7 }, { model: 'b', weight: 0.3 }] });
    expect(duo.meta).toMatchObject({ state: 'ready', vocab_size: a.info.vocabSize, chat_template: true });
  });

  it('weights (1, 0) give the first member alone, through completions and chat (its template), with usage and finish reasons', async () => {
    const body = { prompt: 'Once upon a time', max_tokens: 16, temperature: 0, ignore_eos: true };
    const alone = await complete({ ...body, model: 'a' });
    const fused = await complete({ ...body, model: 'first' });
    expect(fused.model).toBe('first');
    expect(fused.choices[0]!.text).toBe(alone.choices[0]!.text);
    expect(fused.choices[0]!.finish_reason).toBe('length');
    expect(fused.usage).toEqual(alone.usage);
    expect(fused.usage.completion_tokens).toBe(16);

    const chat = { messages: [{ role: 'user' as const, content: 'Hello there' }], max_tokens: 12, temperature: 0, ignore_eos: true };
    const chatAlone = await client.chat.completions.create({ ...chat, model: 'a' } as never);
    const chatFused = await client.chat.completions.create({ ...chat, model: 'first' } as never);
    expect(chatFused.choices[0]!.message.content).toBe(chatAlone.choices[0]!.message.content);
    expect(chatFused.usage).toEqual(chatAlone.usage);
    expect(chatFused.usage!.completion_tokens).toBe(12);

    // A stop string ends the fused text where it ends the member's.
    const stop = alone.choices[0]!.text.slice(6, 9);
    expect(stop.length).toBe(3);
    const stopped = await complete({ ...body, model: 'first', stop: [stop] });
    const stoppedAlone = await complete({ ...body, model: 'a', stop: [stop] });
    expect(stopped.choices[0]).toEqual(stoppedAlone.choices[0]);
    expect(stopped.choices[0]!.finish_reason).toBe('stop');
  });

  it('streams a fused generation (both routes), chunks adding up to the whole text, usage last', async () => {
    const body = { model: 'duo', prompt: 'The quick brown fox', max_tokens: 20, temperature: 0, ignore_eos: true };
    const whole = await complete(body);
    expect(whole.usage.completion_tokens).toBe(20);
    const stream = await client.completions.create({ ...body, stream: true, stream_options: { include_usage: true } } as never);
    let text = '';
    let finish: string | null = null;
    let usage: Completion['usage'] | undefined;
    for await (const chunk of stream as unknown as AsyncIterable<{ choices: Array<{ text: string; finish_reason: string | null }>; usage?: Completion['usage'] | null }>) {
      for (const c of chunk.choices) {
        text += c.text;
        finish = c.finish_reason ?? finish;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(whole.choices[0]!.text);
    expect(finish).toBe('length');
    expect(usage).toEqual(whole.usage);

    const chat = await client.chat.completions.create({
      model: 'duo', messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 10, temperature: 0, stream: true,
    } as never);
    let reply = '';
    let chatFinish: string | null = null;
    for await (const chunk of chat as unknown as AsyncIterable<{ choices: Array<{ delta: { content?: string }; finish_reason: string | null }> }>) {
      reply += chunk.choices[0]?.delta.content ?? '';
      chatFinish = chunk.choices[0]?.finish_reason ?? chatFinish;
    }
    expect(['stop', 'length']).toContain(chatFinish);
    const again = await client.chat.completions.create({ model: 'duo', messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 10, temperature: 0 } as never);
    expect(reply).toBe(again.choices[0]!.message.content);
  });

  it('samples with a seed reproducibly, n choices with seed + i, and differs from either member alone', async () => {
    const body = { model: 'duo', prompt: 'Once upon a time', max_tokens: 12, temperature: 0.9, top_p: 0.9, seed: 7, n: 2, ignore_eos: true };
    const one = await complete(body);
    const two = await complete(body);
    expect(one.choices.map((c) => c.text)).toEqual(two.choices.map((c) => c.text));
    expect(one.usage.completion_tokens).toBe(24);
    const greedy = { prompt: 'Once upon a time', max_tokens: 24, temperature: 0, ignore_eos: true };
    const texts = await Promise.all(['a', 'b', 'duo'].map(async (model) => (await complete({ ...greedy, model })).choices[0]!.text));
    expect(texts[2]).not.toBe(texts[0]);
    expect(texts[2]).not.toBe(texts[1]);
  });

  it('refuses what fusion cannot apply with a 400 naming the parameter; no-op values pass', async () => {
    const body = { model: 'duo', prompt: 'Hi', max_tokens: 2 };
    const refused: Array<[string, unknown]> = [
      ['presence_penalty', 0.5],
      ['frequency_penalty', -1],
      ['repeat_penalty', 1.1],
      ['logit_bias', { '5': 10 }],
      ['response_format', { type: 'json_object' }],
      ['grammar', 'root ::= "a"'],
      ['receipt', true],
    ];
    for (const [param, value] of refused) {
      const r = await post('/v1/completions', { ...body, [param]: value });
      expect(r.status, param).toBe(400);
      const { error } = (await r.json()) as { error: { param: string; code: string; message: string; type: string } };
      expect(error).toMatchObject({ param, code: 'unsupported_parameter', type: 'invalid_request_error' });
      expect(error.message).toContain(`'${param}' is not available with the fused model "duo"`);
    }
    const chat = await post('/v1/chat/completions', { model: 'duo', messages: [{ role: 'user', content: 'Hi' }], presence_penalty: 1 });
    expect(chat.status).toBe(400);
    expect(((await chat.json()) as { error: { param: string } }).error.param).toBe('presence_penalty');
    // Values that change nothing, as clients send by default.
    const ok = await complete({ ...body, presence_penalty: 0, frequency_penalty: 0, repeat_penalty: 1, logit_bias: {}, response_format: { type: 'text' } });
    expect(ok.usage.completion_tokens).toBeGreaterThan(0);
    // Only generation: embeddings name a member; token ids outside the vocabulary are a bad prompt.
    const embed = await post('/v1/embeddings', { model: 'duo', input: 'hello' });
    expect(embed.status).toBe(400);
    expect(((await embed.json()) as { error: { param: string; code: string } }).error).toMatchObject({ param: 'model', code: 'unsupported_model' });
    const ids = await post('/v1/completions', { ...body, prompt: [1, a.info.vocabSize + 5] });
    expect(ids.status).toBe(400);
    expect(((await ids.json()) as { error: { param: string } }).error.param).toBe('prompt');
    const unknown = await post('/v1/completions', { ...body, model: 'trio' });
    expect(unknown.status).toBe(404);
    expect(((await unknown.json()) as { error: { message: string } }).error.message).toMatch(/Available: a, b, first, duo/);
  });

  it('counts fused requests under the fused name in /metrics, and exports the members’ weights', async () => {
    await complete({ model: 'duo', prompt: 'Count me', max_tokens: 5, temperature: 0, ignore_eos: true });
    const text = await (await fetch(`${base}/metrics`)).text();
    expect(text).toMatch(/genesis_generations_total\{model="duo",finish_reason="length"\} [1-9]/);
    expect(text).toMatch(/genesis_completion_tokens_total\{model="duo"\} [1-9]/);
    expect(text).toMatch(/genesis_prompt_tokens_total\{model="first"\} [1-9]/);
    expect(text).toContain('genesis_fused_member_weight{model="duo",member="a"} 0.7');
    expect(text).toContain('genesis_fused_member_weight{model="first",member="b"} 0');
  });

  it('refuses bad declarations before serving: unknown member, bad weights, a taken name, another tokenizer', async () => {
    const models = [{ name: 'a', model: a }, { name: 'b', model: b }];
    const build = (fused: unknown) => () => buildServer({ models, fused: fused as never, processMetrics: false });
    expect(build([{ name: 'x', members: [{ model: 'c', weight: 1 }] }])).toThrow(ServerConfigError);
    expect(build([{ name: 'x', members: [{ model: 'c', weight: 1 }] }])).toThrow(/fused model "x": member "c" is not a served model; served: a, b/);
    expect(build([{ name: 'x', members: [{ model: 'a', weight: -1 }] }])).toThrow(/member "a" has weight -1; expected a finite number ≥ 0/);
    expect(build([{ name: 'x', members: [{ model: 'a', weight: 0 }, { model: 'b', weight: 0 }] }])).toThrow(/at least one member must have a weight > 0/);
    expect(build([{ name: 'a', members: [{ model: 'b', weight: 1 }] }])).toThrow(/fused model "a": a served model already has that name/);
    expect(build([{ name: 'x', members: [] }])).toThrow(/needs at least one member/);
    expect(build([{ name: 'x', members: [{ model: 'a', weight: 1 }] }, { name: 'y', members: [{ model: 'x', weight: 1 }] }])).toThrow(/a fused model cannot be a member/);

    const other = await loadModel(otherPath, { contextSize: 128, maxSequences: 1, threads: 1 });
    try {
      const mixed = () => buildServer({ models: [...models, { name: 'q', model: other }], fused: [{ name: 'x', members: [{ model: 'a', weight: 1 }, { model: 'q', weight: 1 }] }] });
      expect(mixed).toThrow(ServerConfigError);
      expect(mixed).toThrow(/fused model "x": "q" does not have the tokenizer of "a" .*logit fusion needs members with the same tokenizer/);
    } finally {
      await other.dispose();
    }
  });
});

describe('fused models over a runtime (--memory-budget)', { timeout: 120_000 }, () => {
  it('compares tokenizers from the files before loading, checks the members fit together, and generates', async () => {
    const aPath = await makeFixtureModel({ arch: 'llama', type: 'q8_0', nLayer: 2 });
    const bPath = await makeFixtureModel({ arch: 'llama', type: 'q8_0', nLayer: 2, seed: 9 });
    const otherPath = await makeFixtureModel({ arch: 'qwen3moe' });
    const runtimeLoad = { contextSize: 256, maxSequences: 2, threads: 1, gpuLayers: 0 }; // host-memory budgets
    const size = (await estimateMemory(aPath, runtimeLoad)).total;
    const lines: string[] = [];
    const options = { load: runtimeLoad, port: 0, handleSignals: false, log: (line: string) => lines.push(line) };

    await expect(
      serve({ ...options, models: [{ name: 'a', path: aPath }, { name: 'q', path: otherPath }], memoryBudget: 64 * size, fused: [{ name: 'x', members: [{ model: 'a', weight: 1 }, { model: 'q', weight: 1 }] }] }),
    ).rejects.toThrow(/fused model "x": "q" does not have the tokenizer of "a"/);
    expect(lines).toEqual([]); // nothing was loaded
    await expect(
      serve({ ...options, models: [{ name: 'a', path: aPath }, { name: 'b', path: bPath }], memoryBudget: Math.floor(size * 1.5), fused: [{ name: 'x', members: [{ model: 'a', weight: 1 }, { model: 'b', weight: 1 }] }] }),
    ).rejects.toThrow(/fused model "x" holds a and b loaded together: \d+ MiB on CPU, more than the memory budget there/);

    const handle = await serve({ ...options, models: [{ name: 'a', path: aPath }, { name: 'b', path: bPath }], memoryBudget: 4 * size, fused: FUSED });
    try {
      expect(lines.at(-3)).toMatch(/^serving a, b, first \(fused: a × 1, b × 0\), duo \(fused: a × 0.7, b × 0.3\) on http/);
      const body = { prompt: 'Once upon a time', max_tokens: 8, temperature: 0, ignore_eos: true };
      const ask = async (model: string) => {
        const r = await fetch(`${handle.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, model }) });
        expect(r.status, await r.clone().text()).toBe(200);
        return ((await r.json()) as Completion).choices[0]!.text;
      };
      expect(await ask('first')).toBe(await ask('a'));
      // Both members were held while it ran, and released when its response ended.
      const end = performance.now() + 5000;
      while (handle.runtime!.status().some((s) => s.active > 0) && performance.now() < end) await new Promise((r) => setTimeout(r, 10));
      expect(handle.runtime!.status().map((s) => [s.name, s.active, s.state])).toEqual([['a', 0, 'loaded'], ['b', 0, 'loaded']]);
    } finally {
      await handle.stop();
    }
  });
});

describe('genesis serve --fuse', { timeout: 60_000 }, () => {
  const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;
  const run = (args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', cli, 'serve', '--port', '0', ...args], { encoding: 'utf8', timeout: 60_000 });

  it('refuses a malformed flag (usage) and a bad declaration before loading anything, with exit status 2', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0', nLayer: 2 });
    const malformed = run(['--model', `a=${path}`, '--fuse', 'duo=a']);
    expect(malformed.status).toBe(2);
    expect(malformed.stderr).toMatch(/--fuse "duo=a": expected NAME=MODEL:WEIGHT,MODEL:WEIGHT .*"a" is not MODEL:WEIGHT/);
    const unknown = run(['--model', `a=${path}`, '--fuse', 'duo=a:0.5,nope:0.5']);
    expect(unknown.status).toBe(2);
    expect(unknown.stderr).toMatch(/genesis: fused model "duo": member "nope" is not a served model; served: a/);
    expect(unknown.stderr).not.toMatch(/loading a/);
  });
});
