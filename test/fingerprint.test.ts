import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { InvalidOptionError, loadModel, makeFingerprints, verifyFingerprintVerdict, type FingerprintPair, type Model } from '../src/index.js';
import { mulberry32 } from '../src/synthetic/models.js';
import { keySetSha256 } from '../src/verify/fingerprint.js';
import { decodeReceipt } from '../src/verify/receipt.js';
import { loadOrCreateReceiptKey } from '../src/verify/keys.js';
import { makeFixtureModel } from './fixtures/models.js';
import { BATCH_INVARIANT } from './fixtures/gpu.js';

describe('OML fingerprint checks', () => {
  let dir: string;
  let owned: Model;
  let other: Model;
  let ownedPath: string;
  let otherPath: string;
  let pairs: FingerprintPair[];
  const savedConfig = process.env['GENESIS_CONFIG_DIR'];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'genesis-fingerprint-'));
    process.env['GENESIS_CONFIG_DIR'] = join(dir, 'config');
    // Same shape and vocabulary, different weights.
    const [a, b] = await Promise.all([1, 7].map((seed) => makeFixtureModel({ arch: 'llama', type: 'q8_0', seed })));
    ownedPath = a!;
    otherPath = b!;
    // Checks must read the same under concurrent load as alone: CPU (fixtures/gpu.ts).
    owned = await loadModel(ownedPath, { contextSize: 256, maxSequences: 4, threads: 1, ...BATCH_INVARIANT });
    other = await loadModel(otherPath, { contextSize: 256, maxSequences: 4, threads: 1, ...BATCH_INVARIANT });
    const random = mulberry32(42);
    const keys = Array.from({ length: 8 }, (_, i) => `secret-key-${i}-${Math.floor(random() * 1e9).toString(36)}`);
    pairs = await makeFingerprints(owned, keys, { maxTokens: 8 });
  });
  afterAll(async () => {
    await owned?.dispose();
    await other?.dispose();
    if (savedConfig === undefined) delete process.env['GENESIS_CONFIG_DIR'];
    else process.env['GENESIS_CONFIG_DIR'] = savedConfig;
    rmSync(dir, { recursive: true, force: true });
  });

  it('passes on the model the pairs were taken from, with a signed verdict that holds no key', async () => {
    const verdict = await owned.checkFingerprints(pairs, { threshold: 0.9 });
    expect(verdict).toMatchObject({ pairs: 8, matched: 8, rate: 1, threshold: 0.9, passed: true, mismatched: [] });
    expect(verdict.keySetSha256).toBe(keySetSha256(pairs.map((p) => p.key)));
    const check = verifyFingerprintVerdict(verdict.envelope);
    expect(check.reasons).toEqual([]);
    expect(check.valid).toBe(true);
    expect(check.statement!.check).toMatchObject({ matched: 8, passed: true, method: { decoding: 'greedy', comparison: 'token-exact' } });
    expect(check.statement!.model.fileName).toMatch(/\.gguf$/);
    const text = JSON.stringify(verdict) + JSON.stringify(decodeReceipt(verdict.envelope));
    for (const p of pairs) {
      expect(text).not.toContain(p.key);
      expect(text).not.toContain(p.response.trim() || '\u0000');
    }
  });

  it('fails on a model with other weights, naming the mismatched pairs by index only', async () => {
    const verdict = await other.checkFingerprints(pairs, { threshold: 0.9 });
    expect(verdict.passed).toBe(false);
    expect(verdict.rate).toBeLessThan(0.9);
    expect(verdict.mismatched.length).toBe(8 - verdict.matched);
    expect(verifyFingerprintVerdict(verdict.envelope).valid).toBe(true);
  });

  it('is isolated from other requests running on the same model', async () => {
    const noise = Array.from({ length: 3 }, (_, i) => owned.complete(`busy neighbour ${i}`, { maxTokens: 40, temperature: 0.9, seed: i, ignoreEos: true }));
    const verdict = await owned.checkFingerprints(pairs);
    await Promise.all(noise);
    expect(verdict.matched).toBe(8);
  });

  it('catches a tampered verdict and a wrong key; refuses bad pairs without echoing them', async () => {
    const verdict = await other.checkFingerprints(pairs);
    const statement = decodeReceipt(verdict.envelope) as unknown as { check: { passed: boolean } };
    statement.check.passed = true;
    const forged = { ...verdict.envelope, payload: Buffer.from(JSON.stringify(statement)).toString('base64') };
    expect(verifyFingerprintVerdict(forged).reasons.map((r) => r.code)).toContain('SIGNATURE_INVALID');
    const stranger = loadOrCreateReceiptKey(join(dir, 'other-key.pem'));
    expect(verifyFingerprintVerdict(verdict.envelope, { publicKey: stranger.publicKeyPem }).reasons.map((r) => r.code)).toContain('KEY_MISMATCH');

    const bad = [{ key: 'top-secret-value', response: 7 }] as unknown as FingerprintPair[];
    const error = await owned.checkFingerprints(bad).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(InvalidOptionError);
    expect((error as Error).message).toMatch(/pairs\[0\]/);
    expect((error as Error).message).not.toContain('top-secret-value');
    await expect(owned.checkFingerprints(pairs, { threshold: 2 })).rejects.toMatchObject({ option: 'threshold' });
  });

  it('genesis fingerprint check: exit 0 and PASSED on the owned model, 1 on the other; keys never printed', () => {
    const cli = new URL('../src/cli/main.ts', import.meta.url).pathname;
    const file = join(dir, 'pairs.json');
    writeFileSync(file, JSON.stringify(pairs));
    const run = (model: string, out: string) =>
      spawnSync(process.execPath, ['--import', 'tsx', cli, 'fingerprint', 'check', '--model', model, '--pairs', file, '--out', out, '--threads', '1', '--gpu-layers', '0'], {
        encoding: 'utf8',
        timeout: 120_000,
        env: { ...process.env, GENESIS_CONFIG_DIR: join(dir, 'config') },
      });
    const pass = run(ownedPath, join(dir, 'v1.json'));
    expect(pass.status, pass.stderr).toBe(0);
    expect(pass.stdout).toMatch(/^PASSED: 8 of 8 pairs match/);
    expect(verifyFingerprintVerdict(JSON.parse(readFileSync(join(dir, 'v1.json'), 'utf8'))).valid).toBe(true);
    const fail = run(otherPath, join(dir, 'v2.json'));
    expect(fail.status).toBe(1);
    expect(fail.stdout).toMatch(/^NOT PASSED: \d of 8 pairs match/);
    for (const p of pairs) expect(pass.stdout + pass.stderr + fail.stdout + fail.stderr).not.toContain(p.key);
  });
});
