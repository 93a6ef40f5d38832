/**
 * OML-style fingerprint checks: a model owner embeds secret (key, response) pairs in the weights by
 * fine-tuning; anyone holding the pairs can test whether a model is theirs. A check feeds each key
 * as a raw prompt (no chat template, special-token text not parsed), decodes greedily in its own
 * sequence (one KV stream per sequence, so other requests cannot change its output), and compares
 * the output token for token with the response. The verdict is the share of pairs that match,
 * against a threshold, signed with the local receipt key. The keys are secrets: they never appear
 * in the verdict (only the SHA-256 of the key set), in errors or in logs.
 */
import { createHash } from 'node:crypto';

import { InvalidOptionError } from '../errors.js';
import type { Model } from '../model.js';
import { canonicalJson } from './canonical.js';
import { loadOrCreateReceiptKey, rawPublicKey, type ReceiptKey } from './keys.js';
import {
  checkSignature, decodeReceipt, isEnvelope, modelFacts, runtimeFacts, signStatement, type ModelFacts, type ReceiptEnvelope, type ReceiptStatement,
} from './receipt.js';

export const FINGERPRINT_PAYLOAD_TYPE = 'application/vnd.genesis.fingerprint-verdict+json';
export const FINGERPRINT_STATEMENT_TYPE = 'https://genesis-runtime.dev/fingerprint-verdict/v1';

export interface FingerprintPair {
  /** The secret prompt, fed raw. */
  key: string;
  /** The response the fingerprinted model gives. */
  response: string;
  /**
   * The response's exact token ids, when known (makeFingerprints records them): compared as they
   * are. Without them the response text is tokenized (no BOS, special-token text not parsed).
   */
  responseTokens?: number[];
}

export interface FingerprintCheckOptions {
  /** Share of pairs that must match, in [0, 1]. Default 0.9. */
  threshold?: number;
  /** Sign the verdict with this key (default: the local receipt key, created on first use). */
  key?: ReceiptKey;
}

export interface FingerprintStatement {
  _type: typeof FINGERPRINT_STATEMENT_TYPE;
  signer: { keyId: string; publicKey: string };
  model: ModelFacts;
  runtime: ReceiptStatement['runtime'];
  check: {
    method: { prompt: 'raw, no chat template'; decoding: 'greedy'; comparison: 'token-exact'; isolation: 'own sequence and KV stream' };
    /** SHA-256 of the canonical JSON of the sorted keys: names the key set without revealing it. */
    keySetSha256: string;
    pairs: number;
    matched: number;
    rate: number;
    threshold: number;
    passed: boolean;
  };
  timestamps: { startedAt: string; finishedAt: string };
}

export interface FingerprintVerdict {
  pairs: number;
  matched: number;
  rate: number;
  threshold: number;
  passed: boolean;
  keySetSha256: string;
  /** Indices (into the pairs given) of the pairs that did not match; never their content. */
  mismatched: number[];
  /** The signed statement (DSSE envelope, like a receipt). */
  envelope: ReceiptEnvelope;
}

export function keySetSha256(keys: readonly string[]): string {
  return createHash('sha256').update(canonicalJson([...keys].sort())).digest('hex');
}

function checkPairs(pairs: unknown): asserts pairs is FingerprintPair[] {
  if (!Array.isArray(pairs) || pairs.length === 0) throw new InvalidOptionError('pairs', 'a non-empty array of { key, response }', Array.isArray(pairs) ? '[]' : typeof pairs);
  pairs.forEach((p: Partial<FingerprintPair> | null, i) => {
    // The values are secrets: errors name the index and the type, never the content.
    if (!p || typeof p.key !== 'string' || p.key.length === 0 || typeof p.response !== 'string') {
      throw new InvalidOptionError(`pairs[${i}]`, '{ key: non-empty string, response: string }', `a ${p === null ? 'null' : typeof p}`);
    }
    if (p.responseTokens !== undefined && (!Array.isArray(p.responseTokens) || !p.responseTokens.every((t) => Number.isInteger(t) && t >= 0))) {
      throw new InvalidOptionError(`pairs[${i}].responseTokens`, 'an array of token ids', 'something else');
    }
  });
}

async function greedy(model: Model, key: string, maxTokens: number): Promise<number[]> {
  const prompt = model.tokenize(key, { addSpecial: true, parseSpecial: false });
  const r = await model.complete(prompt, { maxTokens, temperature: 0, priority: 1 });
  return r.tokens;
}

/** Runs the check and signs the verdict. */
export async function checkFingerprints(model: Model, pairs: FingerprintPair[], options: FingerprintCheckOptions = {}): Promise<FingerprintVerdict> {
  checkPairs(pairs);
  const threshold = options.threshold ?? 0.9;
  if (typeof threshold !== 'number' || !(threshold >= 0 && threshold <= 1)) throw new InvalidOptionError('threshold', 'a number in [0, 1]', threshold);
  const startedAt = new Date();
  const mismatched: number[] = [];
  for (const [i, pair] of pairs.entries()) {
    const expected = pair.responseTokens ?? model.tokenize(pair.response, { addSpecial: false, parseSpecial: false });
    if (expected.length === 0) throw new InvalidOptionError(`pairs[${i}].response`, 'a response of at least one token', 'an empty one');
    // Exactly as many tokens as the response: an early end of generation is a mismatch.
    const got = await greedy(model, pair.key, expected.length);
    if (got.length !== expected.length || got.some((t, j) => t !== expected[j])) mismatched.push(i);
  }
  const matched = pairs.length - mismatched.length;
  const rate = matched / pairs.length;
  const key = options.key ?? loadOrCreateReceiptKey();
  const check = {
    method: { prompt: 'raw, no chat template', decoding: 'greedy', comparison: 'token-exact', isolation: 'own sequence and KV stream' } as const,
    keySetSha256: keySetSha256(pairs.map((p) => p.key)),
    pairs: pairs.length,
    matched,
    rate,
    threshold,
    passed: rate >= threshold,
  };
  const statement: FingerprintStatement = {
    _type: FINGERPRINT_STATEMENT_TYPE,
    signer: { keyId: key.keyId, publicKey: rawPublicKey(key.publicKey).toString('base64') },
    model: await modelFacts(model.path),
    runtime: runtimeFacts(),
    check,
    timestamps: { startedAt: startedAt.toISOString(), finishedAt: new Date().toISOString() },
  };
  const envelope = signStatement(statement, key, FINGERPRINT_PAYLOAD_TYPE);
  return { ...check, mismatched, envelope };
}

/**
 * Pairs from a model's own greedy answers to `keys` (with their exact token ids): what an owner
 * records before publishing, and what the tests check against.
 */
export async function makeFingerprints(model: Model, keys: readonly string[], options: { maxTokens?: number } = {}): Promise<FingerprintPair[]> {
  const maxTokens = options.maxTokens ?? 16;
  const out: FingerprintPair[] = [];
  for (const key of keys) {
    const tokens = await greedy(model, key, maxTokens);
    out.push({ key, response: model.detokenize(tokens), responseTokens: tokens });
  }
  return out;
}

/** Checks a verdict's signature (by `publicKey`, default the key it names). */
export function verifyFingerprintVerdict(
  envelope: unknown,
  options: { publicKey?: string | Buffer } = {},
): { valid: boolean; reasons: Array<{ code: string; message: string }>; statement?: FingerprintStatement } {
  const reasons: Array<{ code: string; message: string }> = [];
  if (!isEnvelope(envelope)) return { valid: false, reasons: [{ code: 'MALFORMED', message: 'not a DSSE envelope' }] };
  if (envelope.payloadType !== FINGERPRINT_PAYLOAD_TYPE) reasons.push({ code: 'PAYLOAD_TYPE', message: `payloadType is not ${FINGERPRINT_PAYLOAD_TYPE}` });
  const statement = decodeReceipt(envelope) as unknown as FingerprintStatement;
  if (statement?._type !== FINGERPRINT_STATEMENT_TYPE) reasons.push({ code: 'MALFORMED', message: `_type is not ${FINGERPRINT_STATEMENT_TYPE}` });
  checkSignature(envelope, Buffer.from(envelope.payload, 'base64'), statement?.signer, options.publicKey, reasons);
  return { valid: reasons.length === 0, reasons, statement };
}
