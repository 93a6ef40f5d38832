/**
 * Signed receipts (src/verify/receipt.ts, keys.ts, server.ts and the CLI's verify/replay): honest
 * receipts verify and replay identically; tampered payloads and signatures, wrong keys, altered
 * output tokens and other model files are each caught with a specific reason.
 */
import { spawnSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LLAMA_COMMIT } from '../scripts/llama.mjs';
import { loadModel, type Model } from '../src/index.js';
import { buildServer, type GenesisServer } from '../src/server/index.js';
import { canonicalJson } from '../src/verify/canonical.js';
import { hashModel } from '../src/verify/identity.js';
import { loadOrCreateReceiptKey, receiptKeyPath, type ReceiptKey } from '../src/verify/keys.js';
import {
  decodeReceipt,
  generateWithReceipt,
  replayReceipt,
  signStatement,
  verifyReceipt,
  type ReceiptEnvelope,
  type ReceiptStatement,
} from '../src/verify/receipt.js';
import { makeFixtureModel } from './fixtures/models.js';

const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;
const LOAD = { contextSize: 256, maxSequences: 1, threads: 1 } as const;

function reencode(envelope: ReceiptEnvelope, edit: (s: ReceiptStatement) => void): ReceiptEnvelope {
  const statement = decodeReceipt(envelope);
  edit(statement);
  return { ...envelope, payload: Buffer.from(canonicalJson(statement)).toString('base64') };
}

const codes = (r: { reasons: Array<{ code: string }> }) => r.reasons.map((x) => x.code);

describe('receipts', () => {
  let dir: string;
  let pathA: string;
  let pathB: string;
  let a: Model;
  let b: Model;
  let key: ReceiptKey;
  let greedy: { result: { tokens: number[]; finishReason: string }; receipt: ReceiptEnvelope };
  let seeded: { result: { tokens: number[] }; receipt: ReceiptEnvelope };
  const env: Record<string, string | undefined> = {};

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'genesis-receipts-'));
    for (const name of ['GENESIS_CONFIG_DIR', 'GENESIS_CACHE_DIR']) env[name] = process.env[name];
    process.env['GENESIS_CONFIG_DIR'] = join(dir, 'config');
    process.env['GENESIS_CACHE_DIR'] = join(dir, 'cache');
    pathA = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    pathB = await makeFixtureModel({ arch: 'llama', type: 'q8_0', seed: 7 });
    a = await loadModel(pathA, LOAD);
    b = await loadModel(pathB, LOAD);
    key = loadOrCreateReceiptKey();
    greedy = await generateWithReceipt(a, 'The receipt says', { maxTokens: 12, temperature: 0 });
    seeded = await generateWithReceipt(a, 'Sampled with a seed', { maxTokens: 12, temperature: 0.9, topK: 50, seed: 1234 });
  });
  afterAll(async () => {
    await a?.dispose();
    await b?.dispose();
    for (const [name, value] of Object.entries(env)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    await rm(dir, { recursive: true, force: true });
  });

  it('the signing key is created on first use, owner-only', async () => {
    expect(key.path).toBe(join(dir, 'config', 'receipt-key.pem'));
    expect(receiptKeyPath()).toBe(key.path);
    expect((await stat(key.path)).mode & 0o777).toBe(0o600);
    expect((await stat(join(dir, 'config'))).mode & 0o777).toBe(0o700);
    expect(key.keyId).toMatch(/^[0-9a-f]{64}$/);
  });

  it('an honest receipt verifies and holds what ran', async () => {
    const check = await verifyReceipt(greedy.receipt, { publicKey: key.publicKeyPem, modelPath: pathA });
    expect(check.reasons).toEqual([]);
    expect(check.valid).toBe(true);
    const s = check.statement!;
    expect(greedy.receipt.payloadType).toBe('application/vnd.genesis.receipt+json');
    expect(greedy.receipt.signatures[0]!.keyid).toBe(key.keyId);
    expect(Buffer.from(greedy.receipt.payload, 'base64').toString()).toBe(canonicalJson(s));
    expect(s.model.sha256).toBe((await hashModel(pathA)).sha256);
    expect(s.model.fileName).toBe(pathA.split('/').pop());
    expect(s.model.tokenizerSha256).toMatch(/^[0-9a-f]{64}$/);
    expect(s.model.chatTemplateSha256).toMatch(/^[0-9a-f]{64}$/);
    expect(s.runtime.llamaCppCommit).toBe(LLAMA_COMMIT);
    expect(s.runtime.version).toBe('0.1.0');
    expect(['cpu', 'cuda']).toContain(s.runtime.buildVariant);
    expect(s.sampler.chain).toEqual(['greedy']);
    expect(s.sampler.params).toMatchObject({ maxTokens: 12, temperature: 0, topK: 40, topP: 0.95, minP: 0.05, penaltyLastN: 64 });
    expect(s.prompt.tokens).toEqual(a.tokenize('The receipt says'));
    expect(s.output.tokens).toEqual(greedy.result.tokens);
    expect(s.output.finishReason).toBe(greedy.result.finishReason);
    expect(Date.parse(s.timestamps.finishedAt)).toBeGreaterThanOrEqual(Date.parse(s.timestamps.startedAt));

    const seededStatement = decodeReceipt(seeded.receipt);
    expect(seededStatement.sampler.seed).toBe(1234);
    expect(seededStatement.sampler.chain).toEqual(['top_k', 'top_p', 'min_p', 'temp', 'dist']);
    // Without a given key, the key named in the statement is used.
    expect((await verifyReceipt(seeded.receipt)).valid).toBe(true);
  });

  it('hash-only receipts hold no token ids and still verify', async () => {
    const { receipt } = await generateWithReceipt(a, 'Private prompt', { maxTokens: 4, temperature: 0 }, { tokens: 'hash' });
    const s = decodeReceipt(receipt);
    expect(s.prompt.tokens).toBeUndefined();
    expect(s.output.tokens).toBeUndefined();
    expect(s.output.sha256).toMatch(/^[0-9a-f]{64}$/);
    expect((await verifyReceipt(receipt, { publicKey: key.publicKeyPem })).valid).toBe(true);
    expect((await replayReceipt(a, s).catch((e: Error) => e)) as Error).toBeInstanceOf(Error);
  });

  it('a tampered payload is caught', async () => {
    const forged = reencode(greedy.receipt, (s) => {
      s.output.finishReason = 'stop';
    });
    const check = await verifyReceipt(forged, { publicKey: key.publicKeyPem });
    expect(check.valid).toBe(false);
    expect(codes(check)).toEqual(['SIGNATURE_INVALID']);
  });

  it('a tampered signature is caught', async () => {
    const sig = Buffer.from(greedy.receipt.signatures[0]!.sig, 'base64');
    sig[5] = sig[5]! ^ 0xff;
    const forged = { ...greedy.receipt, signatures: [{ ...greedy.receipt.signatures[0]!, sig: sig.toString('base64') }] };
    const check = await verifyReceipt(forged, { publicKey: key.publicKeyPem });
    expect(codes(check)).toEqual(['SIGNATURE_INVALID']);
  });

  it('a wrong public key is caught, and so is a receipt re-signed by another key', async () => {
    const other = generateKeyPairSync('ed25519');
    const otherPem = other.publicKey.export({ type: 'spki', format: 'pem' }).toString();
    const check = await verifyReceipt(greedy.receipt, { publicKey: otherPem });
    expect(check.valid).toBe(false);
    expect(codes(check)).toContain('KEY_MISMATCH');

    const attacker = { ...key, privateKey: other.privateKey, publicKey: other.publicKey };
    const { keyIdOf } = await import('../src/verify/keys.js');
    attacker.keyId = keyIdOf(other.publicKey);
    const resigned = signStatement({ ...decodeReceipt(greedy.receipt), output: { ...decodeReceipt(greedy.receipt).output } }, attacker);
    const trusted = await verifyReceipt(resigned, { publicKey: key.publicKeyPem });
    expect(codes(trusted)).toContain('KEY_MISMATCH');
  });

  it('altered output tokens are caught', async () => {
    const forged = reencode(greedy.receipt, (s) => {
      s.output.tokens![0] = (s.output.tokens![0]! + 1) % 32000;
    });
    const check = await verifyReceipt(forged, { publicKey: key.publicKeyPem });
    expect(check.valid).toBe(false);
    expect(codes(check)).toEqual(expect.arrayContaining(['SIGNATURE_INVALID', 'OUTPUT_TOKENS_MISMATCH']));
  });

  it('another model file (other weights) is caught', async () => {
    const check = await verifyReceipt(greedy.receipt, { publicKey: key.publicKeyPem, modelPath: pathB });
    expect(codes(check)).toEqual(['MODEL_DIGEST_MISMATCH']);
    const garbage = join(dir, 'garbage.gguf');
    await writeFile(garbage, 'not a model');
    expect(codes(await verifyReceipt(greedy.receipt, { modelPath: garbage }))).toEqual(['MODEL_UNREADABLE']);
    expect(codes(await verifyReceipt({ nope: 1 }))).toEqual(['MALFORMED']);
  });

  it('replay of honest receipts is identical (greedy and seeded sampling)', async () => {
    const g = await replayReceipt(a, decodeReceipt(greedy.receipt));
    expect(g).toMatchObject({ identical: true, modelDigestMatches: true });
    expect(g.tokens).toEqual(greedy.result.tokens);
    const s = await replayReceipt(a, decodeReceipt(seeded.receipt));
    expect(s.identical).toBe(true);
    expect(s.tokens).toEqual(seeded.result.tokens);
  });

  it('replay on a model with other weights reports the first divergent token', async () => {
    const statement = decodeReceipt(greedy.receipt);
    const r = await replayReceipt(b, statement);
    expect(r.identical).toBe(false);
    expect(r.modelDigestMatches).toBe(false);
    const d = r.firstDivergence!;
    expect(d.index).toBeGreaterThanOrEqual(0);
    expect(d.expected).toBe(statement.output.tokens![d.index] ?? null);
    expect(d.actual).toBe(r.tokens[d.index] ?? null);
    expect(d.actual).not.toBe(d.expected);
    expect(r.tokens.slice(0, d.index)).toEqual(statement.output.tokens!.slice(0, d.index));
  });

  it('genesis verify and genesis replay', async () => {
    const honest = join(dir, 'honest.json');
    const forged = join(dir, 'forged.json');
    await writeFile(honest, JSON.stringify(seeded.receipt));
    await writeFile(forged, JSON.stringify(reencode(seeded.receipt, (s) => void (s.sampler.seed = 1))));
    const genesis = (...args: string[]) =>
      spawnSync(process.execPath, ['--import', 'tsx', cli, ...args], { encoding: 'utf8', timeout: 120_000, env: process.env });
    const ok = genesis('verify', honest, '--model', pathA);
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/^valid: signed by key [0-9a-f]{64}/);
    const bad = genesis('verify', forged);
    expect(bad.status).toBe(1);
    expect(bad.stdout).toContain('SIGNATURE_INVALID');
    const otherModel = genesis('verify', honest, '--model', pathB);
    expect(otherModel.status).toBe(1);
    expect(otherModel.stdout).toContain('MODEL_DIGEST_MISMATCH');

    const same = genesis('replay', honest, '--model', pathA, '--threads', '1');
    expect(same.status, same.stderr).toBe(0);
    expect(same.stdout).toBe(`identical: ${seeded.result.tokens.length} output tokens\n`);
    const diverged = genesis('replay', honest, '--model', pathB, '--threads', '1');
    expect(diverged.status, diverged.stderr).toBe(1);
    expect(diverged.stdout).toMatch(/^divergent at token \d+: receipt \d+, replay \d+\n$/);
  });

  describe('server', () => {
    let app: GenesisServer;
    let base: string;
    const post = async (path: string, body: unknown) => {
      const r = await fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      return { status: r.status, text: await r.text() };
    };

    beforeAll(async () => {
      app = buildServer({ models: [{ name: 'tiny', model: a }], host: '127.0.0.1', processMetrics: false });
      await app.listen({ host: '127.0.0.1', port: 0 });
      base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
    });
    afterAll(() => app?.close());

    it('chat: receipt in the response; the verify endpoint says valid, and invalid when tampered', async () => {
      const r = await post('/v1/chat/completions', {
        model: 'tiny',
        messages: [{ role: 'user', content: 'Hello there' }],
        max_tokens: 6,
        temperature: 0,
        receipt: true,
      });
      expect(r.status, r.text).toBe(200);
      const body = JSON.parse(r.text);
      const receipt = body.receipt as ReceiptEnvelope;
      const s = decodeReceipt(receipt);
      expect(a.detokenize(s.output.tokens!)).toBe(body.choices[0].message.content);
      // The recorded prompt ids are the chat template's, exactly as model.chat() would run them.
      const direct = await a.chat([{ role: 'user', content: 'Hello there' }], { maxTokens: 6, temperature: 0 }).result;
      expect(s.output.tokens).toEqual(direct.tokens);
      expect((await replayReceipt(a, s)).identical).toBe(true);

      const ok = JSON.parse((await post('/v1/receipts/verify', { receipt, model: 'tiny' })).text);
      expect(ok).toMatchObject({ valid: true, reasons: [], key_id: key.keyId });
      const tampered = reencode(receipt, (st) => void (st.output.finishReason = 'eog'));
      const bad = JSON.parse((await post('/v1/receipts/verify', tampered)).text);
      expect(bad.valid).toBe(false);
      expect(bad.reasons.map((x: { code: string }) => x.code)).toContain('SIGNATURE_INVALID');

      const plain = JSON.parse((await post('/v1/chat/completions', { model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2 })).text);
      expect(plain.receipt).toBeUndefined();
      const many = await post('/v1/chat/completions', { model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2, n: 2, receipt: true });
      expect(many.status).toBe(400);
    });

    it('completions stream: the final chunk carries the receipt', async () => {
      const r = await post('/v1/completions', { model: 'tiny', prompt: 'Streamed', max_tokens: 5, temperature: 0, stream: true, receipt: { tokens: 'hash' } });
      expect(r.status).toBe(200);
      const events = r.text
        .split('\n\n')
        .map((e) => e.replace(/^data: /, '').trim())
        .filter((e) => e && e !== '[DONE]')
        .map((e) => JSON.parse(e));
      const last = events.at(-1);
      expect(last.choices).toEqual([]);
      const s = decodeReceipt(last.receipt);
      expect(s.output.tokens).toBeUndefined();
      expect(s.output.count).toBe(5);
      const check = JSON.parse((await post('/v1/receipts/verify', { receipt: last.receipt, public_key: key.publicKeyPem })).text);
      expect(check.valid).toBe(true);

      const whole = JSON.parse((await post('/v1/completions', { model: 'tiny', prompt: 'Streamed', max_tokens: 5, temperature: 0, receipt: true })).text);
      expect(decodeReceipt(whole.receipt).output.sha256).toBe(s.output.sha256);
    });
  });
});
