/**
 * `genesis serve` as a child process: SIGTERM drains (the request in flight completes whole, a new
 * request meanwhile gets 503, the process exits 0), and the refusal to listen off loopback without
 * an API key.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterEach, describe, expect, it } from 'vitest';
import { makeFixtureModel } from './fixtures/models.js';

const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;
const children: ChildProcess[] = [];

afterEach(() => {
  for (const child of children.splice(0)) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
});

/** Starts `genesis serve ...` and resolves with its URL once it listens. */
/** `genesis serve` with one model and the given flags, run to its exit (refusals, usage errors). */
function serveOnce(model: string, args: string[]) {
  return spawnSync(process.execPath, ['--import', 'tsx', cli, 'serve', '--port', '0', '--threads', '1', '--model', model, ...args], {
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, GENESIS_API_KEY: '' },
  });
}

function startServer(args: string[]): Promise<{ child: ChildProcess; url: string; stderr: () => string; exited: Promise<number | null> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', cli, 'serve', '--port', '0', '--threads', '1', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, GENESIS_API_KEY: '' },
  });
  children.push(child);
  let stderr = '';
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start in time:\n${stderr}`)), 60_000);
    child.stderr!.on('data', (data: Buffer) => {
      stderr += data.toString();
      const match = /serving .* on (http:\/\/127\.0\.0\.1:\d+)/.exec(stderr);
      if (match) {
        clearTimeout(timer);
        resolve({ child, url: match[1]!, stderr: () => stderr, exited });
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code} before listening:\n${stderr}`));
    });
  });
}

describe('genesis serve', { timeout: 90_000 }, () => {
  it('SIGTERM drains: the stream in flight completes whole, new requests get 503, exit 0', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const server = await startServer(['--model', `tiny=${path}`, '--context-size', '2048', '--max-sequences', '2']);
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'none', maxRetries: 0 });
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['tiny']);

    const maxTokens = 1500; // about 1.5 s of generation on one thread: long enough to signal mid-stream
    const stream = await client.completions.create({
      model: 'tiny',
      prompt: 'Drain me',
      max_tokens: maxTokens,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
    } as never);
    const iterator = (stream as unknown as AsyncIterable<OpenAI.Completion>)[Symbol.asyncIterator]();
    let text = '';
    const first = await iterator.next();
    text += first.value?.choices[0]?.text ?? '';

    server.child.kill('SIGTERM');
    const draining = performance.now();
    while (!/SIGTERM: draining/.test(server.stderr()) && performance.now() - draining < 10_000) await new Promise((r) => setTimeout(r, 10));
    expect(server.stderr()).toMatch(/SIGTERM: draining/);

    // A new request while draining is refused with 503 in OpenAI's shape.
    const refused = await fetch(`${server.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'tiny', prompt: 'too late', max_tokens: 2 }),
    });
    expect(refused.status).toBe(503);
    expect(await refused.json()).toMatchObject({ error: { type: 'service_unavailable', code: 'server_shutting_down' } });
    const health = await fetch(`${server.url}/health`);
    expect(health.status).toBe(503);
    // ...while the stream's generation is still running.
    expect(await health.json()).toMatchObject({ status: 'draining', models: [{ id: 'tiny', active: 1 }] });
    expect(server.child.exitCode).toBeNull(); // still serving the stream

    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | null | undefined;
    for (;;) {
      const next = await iterator.next();
      if (next.done) break;
      text += next.value.choices[0]?.text ?? '';
      finish = next.value.choices[0]?.finish_reason ?? finish;
      if (next.value.usage) usage = next.value.usage;
    }
    expect(finish).toBe('length');
    expect(usage?.completion_tokens).toBe(maxTokens);
    expect(text.length).toBeGreaterThan(maxTokens / 2);

    expect(await server.exited).toBe(0);
    expect(server.stderr()).toMatch(/drained; models disposed/);
  });

  it('refuses a non-loopback address without an API key, before loading anything', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', cli, 'serve', '--host', '0.0.0.0', '--model', '/nonexistent.gguf'], {
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, GENESIS_API_KEY: '' },
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/refusing to listen on 0\.0\.0\.0 without an API key/);
    expect(r.stderr).toMatch(/--api-key/);
    const help = spawnSync(process.execPath, ['--import', 'tsx', cli, 'serve', '--help'], { encoding: 'utf8', timeout: 60_000 });
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/genesis serve/);
  });

  it('--kv-swap: a size for the preempted sequences of the pool, refused when malformed or without a pool', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const run = (...args: string[]) => serveOnce(`tiny=${path}`, args);
    const malformed = run('--kv-budget', '256', '--kv-swap', 'lots');
    expect(malformed.status).toBe(2);
    expect(malformed.stderr).toMatch(/--kv-swap expects a size such as 6G/);
    const poolless = run('--kv-swap', '1M');
    expect(poolless.status).not.toBe(0);
    expect(poolless.stderr).toMatch(/kvSwapMemory/);
    expect(poolless.stderr).toMatch(/kvBudget or kvPaged/);
    const server = await startServer(['--model', `tiny=${path}`, '--kv-budget', '256', '--kv-swap', '1M']);
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics).toMatch(/^genesis_kv_swap_bytes\{model="tiny"\} 0$/m);
    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);
  });

  it('--kv-block-size: blocks of the paged pool on /metrics, refused without --kv-paged or when not a power of two', async () => {
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const run = (...args: string[]) => serveOnce(`tiny=${path}`, args);
    for (const args of [['--kv-block-size', '16'], ['--kv-paged', '--kv-block-size', '24']]) {
      const refused = run(...args);
      expect(refused.status).not.toBe(0);
      expect(refused.stderr).toMatch(/kvBlockSize/);
    }
    const server = await startServer(['--model', `tiny=${path}`, '--kv-paged', '--kv-block-size', '16', '--context-size', '256', '--max-sequences', '2']);
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics).toMatch(/^genesis_kv_pool_blocks_used\{model="tiny"\} 0$/m);
    expect(metrics).toMatch(/^genesis_kv_pool_blocks_free\{model="tiny"\} 32$/m);
    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);
  });

  it('--cpu-moe and --gpu-experts copy the hottest experts by --expert-heat; the file must be readable JSON', async () => {
    const path = await makeFixtureModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 3, nEmbd: 64 });
    const dir = mkdtempSync(join(tmpdir(), 'genesis-heat-'));
    const run = (...args: string[]) => serveOnce(`moe=${path}`, args);
    const missing = run('--cpu-moe', '3', '--gpu-experts', '2', '--expert-heat', join(dir, 'none.json'));
    expect(missing.status).toBe(2);
    expect(missing.stderr).toMatch(/--expert-heat .*none\.json.*cannot read it/);
    writeFileSync(join(dir, 'bad.json'), '{ "layers": ');
    const bad = run('--cpu-moe', '3', '--gpu-experts', '2', '--expert-heat', join(dir, 'bad.json'));
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/not JSON/);
    const heat = join(dir, 'heat.json');
    writeFileSync(heat, JSON.stringify({ layers: [0, 1, 2].map((layer) => ({ layer, counts: [0, 0, 0, 0, 0, 9, 8, 0] })) }));
    const server = await startServer(['--model', `moe=${path}`, '--cpu-moe', '3', '--gpu-experts', '2', '--expert-heat', heat, '--expert-stats']);
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'none', maxRetries: 0 });
    await client.completions.create({ model: 'moe', prompt: 'Once upon a time', max_tokens: 8 });
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    const shares = [...metrics.matchAll(/^genesis_expert_copies_share\{model="moe",layer="(\d)"\} ([\d.e-]+)$/gm)];
    expect(shares.map((m) => m[1])).toEqual(['0', '1', '2']);
    for (const m of shares) expect(Number(m[2])).toBeGreaterThanOrEqual(0);
    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);
  });

  it('with no --model serves the built-in demo model, labelled as random weights', async () => {
    const server = await startServer(['--context-size', '512', '--max-sequences', '1']);
    expect(server.stderr()).toMatch(/RANDOM WEIGHTS/);
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'none', maxRetries: 0 });
    const list = await client.models.list();
    expect(list.data.map((m) => [m.id, (m as unknown as { meta: { random_weights: boolean } }).meta.random_weights])).toEqual([['genesis-demo', true]]);
    const r = await client.chat.completions.create({ model: 'genesis-demo', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4 });
    expect(r.usage?.completion_tokens).toBeGreaterThan(0);
    server.child.kill('SIGINT');
    expect(await server.exited).toBe(0);
  });
});
