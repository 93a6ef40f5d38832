/**
 * Signed generation receipts: which weights (tensor digest), tokenizer and chat template ran, in
 * which runtime build on which device, with which sampler chain, parameters and seed, on which
 * prompt tokens, producing which output tokens. The statement is canonical JSON (./canonical.ts)
 * inside a DSSE envelope signed with the local Ed25519 key (./keys.ts) over DSSE's PAE.
 *
 *   const { result, receipt } = await generateWithReceipt(model, 'Hello', { maxTokens: 16, seed: 1 });
 *   const check = await verifyReceipt(receipt, { modelPath: model.path });   // { valid, reasons, statement }
 */
import { createHash, sign as edSign, verify as edVerify, createPublicKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { basename } from 'node:path';
import { LLAMA_COMMIT } from '../../scripts/llama.mjs';
import type { GenerationResult } from '../generation.js';
import type { GgufMetadataValue } from '../gguf/index.js';
import { readGguf } from '../gguf/index.js';
import type { ChatMessage, Model } from '../model.js';
import { resolveSamplingOptions, type GenerateOptions, type SamplingOptions } from '../options.js';
import { systemInfo } from '../system.js';
import { canonicalJson } from './canonical.js';
import { hashModel } from './identity.js';
import { keyIdOf, loadOrCreateReceiptKey, rawPublicKey, toPublicKey, type ReceiptKey } from './keys.js';

export const RECEIPT_PAYLOAD_TYPE = 'application/vnd.genesis.receipt+json';
export const RECEIPT_STATEMENT_TYPE = 'https://genesis-runtime.dev/receipt/v1';

export interface ReceiptEnvelope {
  payloadType: string;
  /** base64 of the canonical JSON statement. */
  payload: string;
  signatures: Array<{ keyid: string; sig: string }>;
}

/** Resolved sampler parameters, as the native sampler chain gets them. -Infinity biases are written as the string '-Infinity'. */
export interface ReceiptSamplerParams {
  maxTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repeatPenalty: number;
  frequencyPenalty: number;
  presencePenalty: number;
  penaltyLastN: number;
  logitBias: Array<[number, number | '-Infinity']>;
  stop: string[];
  ignoreEos: boolean;
  grammar: string;
}

export interface TokenRecord {
  count: number;
  /** Hex SHA-256 of the token ids as little-endian int32. */
  sha256: string;
  /** The ids themselves, unless the receipt was made with `{ tokens: 'hash' }`. */
  tokens?: number[];
}

export interface ReceiptStatement {
  _type: string;
  signer: { keyId: string; publicKey: string };
  model: { sha256: string; fileName: string; tokenizerSha256: string; chatTemplateSha256: string | null };
  runtime: { name: string; version: string; llamaCppCommit: string; buildVariant: string; buildInfo: string; device: string };
  sampler: { chain: string[]; params: ReceiptSamplerParams; seed: number };
  prompt: TokenRecord;
  output: TokenRecord & { finishReason: string };
  timestamps: { startedAt: string; finishedAt: string; signedAt: string };
}

export interface ReceiptOptions {
  /** 'ids' (default) records the token ids; 'hash' only their SHA-256. */
  tokens?: 'ids' | 'hash';
  /** Signing key. Default: loadOrCreateReceiptKey(). */
  key?: ReceiptKey;
}

export interface ReceiptInput {
  /** The exact prompt token ids the model was given. */
  promptTokens: readonly number[];
  /** The sampling options generate() was given (defaults are resolved here, the seed comes from the result). */
  options: SamplingOptions;
  result: GenerationResult;
  startedAt?: Date;
  finishedAt?: Date;
}

export type ReceiptReasonCode =
  | 'MALFORMED'
  | 'PAYLOAD_TYPE'
  | 'KEY_MISMATCH'
  | 'SIGNATURE_INVALID'
  | 'PROMPT_TOKENS_MISMATCH'
  | 'OUTPUT_TOKENS_MISMATCH'
  | 'MODEL_DIGEST_MISMATCH'
  | 'MODEL_UNREADABLE';

export interface ReceiptReason {
  code: ReceiptReasonCode;
  message: string;
}

export interface ReceiptVerification {
  valid: boolean;
  reasons: ReceiptReason[];
  /** The decoded statement (present whenever the payload parses, even if invalid). */
  statement?: ReceiptStatement;
  /** Key id the signature was checked against. */
  keyId?: string;
}

// ---------------------------------------------------------------------------------------------

/** DSSE pre-authentication encoding: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body. */
export function pae(payloadType: string, payload: Buffer): Buffer {
  const type = Buffer.from(payloadType, 'utf8');
  return Buffer.concat([Buffer.from(`DSSEv1 ${type.length} `), type, Buffer.from(` ${payload.length} `), payload]);
}

/** Hex SHA-256 of token ids as little-endian int32. */
export function tokensSha256(tokens: readonly number[]): string {
  const bytes = Buffer.alloc(tokens.length * 4);
  tokens.forEach((t, i) => bytes.writeInt32LE(t, i * 4));
  return createHash('sha256').update(bytes).digest('hex');
}

function tokenRecord(tokens: readonly number[], mode: 'ids' | 'hash'): TokenRecord {
  return { count: tokens.length, sha256: tokensSha256(tokens), ...(mode === 'ids' ? { tokens: [...tokens] } : {}) };
}

let runtimeVersion: string | undefined;
function packageVersion(): string {
  if (runtimeVersion === undefined) {
    try {
      runtimeVersion = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
    } catch {
      runtimeVersion = 'unknown';
    }
  }
  return runtimeVersion;
}

function metadataJson(value: GgufMetadataValue): unknown {
  if (value.type === 'array') {
    return { type: `array<${value.itemType}>`, value: Array.from(value.value as ArrayLike<unknown>, scalarJson) };
  }
  return { type: value.type, value: scalarJson(value.value) };
}

function scalarJson(v: unknown): unknown {
  if (typeof v === 'bigint') return v.toString();
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  return v;
}

export interface ModelFacts {
  sha256: string;
  fileName: string;
  tokenizerSha256: string;
  chatTemplateSha256: string | null;
}

const factsCache = new Map<string, Promise<ModelFacts>>();

/**
 * The model part of a receipt: tensor digest (identity.ts), tokenizer hash (SHA-256 of the
 * canonical JSON of every `tokenizer.*` metadata key except the chat templates, as
 * `{ key: { type, value } }`) and chat-template hash (SHA-256 of tokenizer.chat_template's UTF-8).
 */
export function modelFacts(path: string): Promise<ModelFacts> {
  let facts = factsCache.get(path);
  if (!facts) {
    facts = (async () => {
      const [digest, gguf] = await Promise.all([hashModel(path), readGguf(path)]);
      const tokenizer: Record<string, unknown> = {};
      for (const [key, value] of gguf.metadata) {
        if (key.startsWith('tokenizer.') && !key.startsWith('tokenizer.chat_template')) tokenizer[key] = metadataJson(value);
      }
      const template = gguf.metadata.get('tokenizer.chat_template');
      return {
        sha256: digest.sha256,
        fileName: basename(path),
        tokenizerSha256: createHash('sha256').update(canonicalJson(tokenizer)).digest('hex'),
        chatTemplateSha256: template?.type === 'string' ? createHash('sha256').update(template.value, 'utf8').digest('hex') : null,
      };
    })();
    facts.catch(() => factsCache.delete(path));
    factsCache.set(path, facts);
  }
  return facts;
}

/** The sampler chain the native engine builds for these parameters (native/engine/sampling.cc), in order. */
export function samplerChain(p: ReceiptSamplerParams): string[] {
  const chain: string[] = [];
  if (p.grammar) chain.push('grammar');
  if (p.logitBias.length > 0) chain.push('logit_bias');
  if (p.repeatPenalty !== 1 || p.frequencyPenalty !== 0 || p.presencePenalty !== 0) chain.push('penalties');
  if (p.temperature <= 0) return [...chain, 'greedy'];
  if (p.topK > 0) chain.push('top_k');
  if (p.topP < 1) chain.push('top_p');
  if (p.minP > 0) chain.push('min_p');
  return [...chain, 'temp', 'dist'];
}

/** Sampler parameters resolved with the library defaults (options.ts), as generate() would. */
export function resolveReceiptSampler(model: Model, options: SamplingOptions, seed: number): { params: ReceiptSamplerParams; seed: number } {
  const { signal: _signal, ...rest } = options;
  const r = resolveSamplingOptions({ ...rest, seed }, model.info.vocabSize);
  const params: ReceiptSamplerParams = {
    maxTokens: r.maxTokens,
    temperature: r.temperature,
    topK: r.topK,
    topP: r.topP,
    minP: r.minP,
    repeatPenalty: r.repeatPenalty,
    frequencyPenalty: r.frequencyPenalty,
    presencePenalty: r.presencePenalty,
    penaltyLastN: r.penaltyLastN === -1 ? model.info.context.contextSize : r.penaltyLastN,
    logitBias: r.logitBias.map(([id, bias]) => [id, bias === -Infinity ? '-Infinity' : bias]),
    stop: r.stop,
    ignoreEos: r.ignoreEos,
    grammar: r.grammar,
  };
  return { params, seed: r.seed };
}

/** Generation options that reproduce a receipt's sampler (for replay). */
export function samplingFromReceipt(statement: ReceiptStatement): GenerateOptions {
  const p = statement.sampler.params;
  return {
    maxTokens: p.maxTokens > 0 ? p.maxTokens : undefined,
    temperature: p.temperature,
    topK: p.topK,
    topP: p.topP,
    minP: p.minP,
    repeatPenalty: p.repeatPenalty,
    frequencyPenalty: p.frequencyPenalty,
    presencePenalty: p.presencePenalty,
    penaltyLastN: p.penaltyLastN,
    logitBias: p.logitBias.map(([id, bias]) => [id, bias === '-Infinity' ? -Infinity : bias] as [number, number]),
    stop: p.stop,
    ignoreEos: p.ignoreEos,
    grammar: p.grammar || undefined,
    seed: statement.sampler.seed,
  };
}

function deviceString(variant: string): string {
  const cpu = cpus()[0]?.model?.trim() ?? 'unknown cpu';
  return `${variant}; cpu: ${cpu} x${cpus().length}; ${process.platform}-${process.arch}`;
}

/** What ran: this package, the llama.cpp commit and build, the device. */
export function runtimeFacts(): ReceiptStatement['runtime'] {
  const system = systemInfo();
  return {
    name: 'genesis-runtime',
    version: packageVersion(),
    llamaCppCommit: LLAMA_COMMIT,
    buildVariant: system.variant,
    buildInfo: system.llamaCpp,
    device: deviceString(system.variant),
  };
}

/** Signs any statement into a DSSE envelope. */
export function signStatement(statement: object, key: ReceiptKey = loadOrCreateReceiptKey(), payloadType = RECEIPT_PAYLOAD_TYPE): ReceiptEnvelope {
  const payload = Buffer.from(canonicalJson(statement), 'utf8');
  const sig = edSign(null, pae(payloadType, payload), key.privateKey);
  return { payloadType, payload: payload.toString('base64'), signatures: [{ keyid: key.keyId, sig: sig.toString('base64') }] };
}

/** A signed receipt for one finished generation of `model`. */
export async function createReceipt(model: Model, input: ReceiptInput, options: ReceiptOptions = {}): Promise<ReceiptEnvelope> {
  const key = options.key ?? loadOrCreateReceiptKey();
  const mode = options.tokens ?? 'ids';
  const facts = await modelFacts(model.path);
  const { params, seed } = resolveReceiptSampler(model, input.options, input.result.seed);
  const finishedAt = input.finishedAt ?? new Date();
  const t = input.result.timings;
  const startedAt = input.startedAt ?? new Date(finishedAt.getTime() - (t.queuedMs + t.promptMs + t.generationMs));
  const statement: ReceiptStatement = {
    _type: RECEIPT_STATEMENT_TYPE,
    signer: { keyId: key.keyId, publicKey: rawPublicKey(key.publicKey).toString('base64') },
    model: facts,
    runtime: runtimeFacts(),
    sampler: { chain: samplerChain(params), params, seed },
    prompt: tokenRecord(input.promptTokens, mode),
    output: { ...tokenRecord(input.result.tokens, mode), finishReason: input.result.finishReason },
    timestamps: { startedAt: startedAt.toISOString(), finishedAt: finishedAt.toISOString(), signedAt: new Date().toISOString() },
  };
  return signStatement(statement, key);
}

/**
 * Prompt token ids exactly as model.chat() builds them: the chat template's text, tokenized with
 * special tokens parsed, without a second BOS when the template spells one out.
 */
export function chatPromptTokens(model: Model, messages: ChatMessage[], chatTemplate?: string): number[] {
  const text = model.applyChatTemplate(messages, { addAssistant: true, template: chatTemplate });
  const { bos, addBos } = model.info.specialTokens;
  const bosText = addBos && bos >= 0 ? model.detokenize([bos], { renderSpecial: true }) : '';
  const addSpecial = !(bosText.length > 0 && text.startsWith(bosText));
  return model.tokenize(text, { addSpecial, parseSpecial: true });
}

/** generate() plus a receipt: the prompt is tokenized here so the receipt names the exact ids. */
export async function generateWithReceipt(
  model: Model,
  prompt: string | readonly number[],
  options: GenerateOptions = {},
  receiptOptions: ReceiptOptions = {},
): Promise<{ result: GenerationResult; receipt: ReceiptEnvelope }> {
  const promptTokens = typeof prompt === 'string' ? model.tokenize(prompt, { addSpecial: options.addSpecial ?? true, parseSpecial: true }) : [...prompt];
  const startedAt = new Date();
  const result = await model.generate(promptTokens, options).result;
  const receipt = await createReceipt(model, { promptTokens, options, result, startedAt, finishedAt: new Date() }, receiptOptions);
  return { result, receipt };
}

// ---------------------------------------------------------------------------------------------

export function isEnvelope(v: unknown): v is ReceiptEnvelope {
  const e = v as ReceiptEnvelope;
  return (
    !!e && typeof e === 'object' && typeof e.payloadType === 'string' && typeof e.payload === 'string' && Array.isArray(e.signatures) &&
    e.signatures.every((s) => s && typeof s.keyid === 'string' && typeof s.sig === 'string')
  );
}

/** Decodes an envelope's statement without checking anything. */
export function decodeReceipt(envelope: ReceiptEnvelope): ReceiptStatement {
  return JSON.parse(Buffer.from(envelope.payload, 'base64').toString('utf8')) as ReceiptStatement;
}

function checkTokens(record: TokenRecord | undefined, what: 'prompt' | 'output', reasons: ReceiptReason[]): void {
  if (!record || typeof record.sha256 !== 'string' || typeof record.count !== 'number') {
    reasons.push({ code: 'MALFORMED', message: `the statement has no ${what} token record` });
    return;
  }
  if (record.tokens === undefined) return;
  const code = what === 'prompt' ? 'PROMPT_TOKENS_MISMATCH' : 'OUTPUT_TOKENS_MISMATCH';
  if (!Array.isArray(record.tokens) || !record.tokens.every((t) => Number.isInteger(t))) {
    reasons.push({ code, message: `the ${what} token ids are not integers` });
  } else if (record.tokens.length !== record.count || tokensSha256(record.tokens) !== record.sha256) {
    reasons.push({ code, message: `the ${what} token ids do not match their recorded count/sha256 (${record.count} tokens, ${record.sha256})` });
  }
}

export interface VerifyReceiptOptions {
  /** The key the receipt must be signed by (SPKI or private PEM, or a KeyObject). Default: the key named in the statement. */
  publicKey?: string | Buffer | KeyObject;
  /** The model file at hand: its tensor digest must equal the receipt's. */
  modelPath?: string;
}

/**
 * Checks a DSSE envelope's signature by `publicKey` (default: the key its statement names) and
 * appends what is wrong to `reasons`; returns the key id checked.
 */
export function checkSignature(
  envelope: ReceiptEnvelope,
  payload: Buffer,
  signer: { keyId?: string; publicKey?: string } | undefined,
  publicKey: string | Buffer | KeyObject | undefined,
  reasons: Array<{ code: string; message: string }>,
): string | undefined {
  let key: KeyObject | undefined;
  try {
    if (publicKey !== undefined) key = toPublicKey(publicKey);
    else if (typeof signer?.publicKey === 'string') {
      const raw = Buffer.from(signer.publicKey, 'base64');
      // SPKI DER prefix of an Ed25519 key (RFC 8410) + the 32 raw bytes.
      key = createPublicKey({ key: Buffer.concat([Buffer.from('302a300506032b6570032100', 'hex'), raw]), format: 'der', type: 'spki' });
    }
  } catch (error) {
    reasons.push({ code: 'MALFORMED', message: `unusable public key: ${(error as Error).message}` });
  }
  let keyId: string | undefined;
  if (key) {
    keyId = keyIdOf(key);
    const signature = envelope.signatures.find((s) => s.keyid === keyId);
    if (!signature) {
      reasons.push({
        code: 'KEY_MISMATCH',
        message: `no signature by key ${keyId}; signed by ${envelope.signatures.map((s) => s.keyid).join(', ') || 'nobody'}`,
      });
    } else if (!edVerify(null, pae(envelope.payloadType, payload), key, Buffer.from(signature.sig, 'base64'))) {
      reasons.push({ code: 'SIGNATURE_INVALID', message: `the signature by key ${keyId} does not match the payload (altered payload or signature)` });
    }
    if (signer?.keyId !== undefined && signer.keyId !== keyId && publicKey !== undefined) {
      reasons.push({ code: 'KEY_MISMATCH', message: `the statement names signer ${signer.keyId}, not the given key ${keyId}` });
    }
  } else if (!reasons.some((r) => r.code === 'MALFORMED')) {
    reasons.push({ code: 'MALFORMED', message: 'no public key given and none in the statement' });
  }
  return keyId;
}

/** Checks a receipt's envelope, signature, internal consistency and (optionally) the model file. */
export async function verifyReceipt(envelope: unknown, options: VerifyReceiptOptions = {}): Promise<ReceiptVerification> {
  const reasons: ReceiptReason[] = [];
  if (!isEnvelope(envelope)) {
    return { valid: false, reasons: [{ code: 'MALFORMED', message: 'not a DSSE envelope { payloadType, payload, signatures: [{ keyid, sig }] }' }] };
  }
  if (envelope.payloadType !== RECEIPT_PAYLOAD_TYPE) {
    reasons.push({ code: 'PAYLOAD_TYPE', message: `payloadType is ${JSON.stringify(envelope.payloadType)}, expected ${RECEIPT_PAYLOAD_TYPE}` });
  }
  const payload = Buffer.from(envelope.payload, 'base64');
  let statement: ReceiptStatement | undefined;
  try {
    statement = JSON.parse(payload.toString('utf8')) as ReceiptStatement;
    if (!statement || typeof statement !== 'object' || statement._type !== RECEIPT_STATEMENT_TYPE) throw new Error(`_type is not ${RECEIPT_STATEMENT_TYPE}`);
  } catch (error) {
    reasons.push({ code: 'MALFORMED', message: `the payload is not a receipt statement: ${(error as Error).message}` });
    return { valid: false, reasons, statement: undefined };
  }

  const keyId = checkSignature(envelope, payload, statement.signer, options.publicKey, reasons);

  checkTokens(statement.prompt, 'prompt', reasons);
  checkTokens(statement.output, 'output', reasons);

  if (options.modelPath !== undefined) {
    try {
      const digest = await hashModel(options.modelPath);
      if (digest.sha256 !== statement.model?.sha256) {
        reasons.push({
          code: 'MODEL_DIGEST_MISMATCH',
          message: `model file ${options.modelPath} has tensor digest ${digest.sha256}, the receipt names ${statement.model?.sha256}`,
        });
      }
    } catch (error) {
      reasons.push({ code: 'MODEL_UNREADABLE', message: `cannot hash ${options.modelPath}: ${(error as Error).message}` });
    }
  }
  return { valid: reasons.length === 0, reasons, statement, keyId };
}

// ---------------------------------------------------------------------------------------------

export interface ReplayReport {
  identical: boolean;
  /** Output tokens of the replay. */
  tokens: number[];
  /** First index where the replay differs from the receipt (absent when identical, or when the receipt holds only hashes). */
  firstDivergence?: { index: number; expected: number | null; actual: number | null };
  /** The receipt's model digest differs from the replaying model's. */
  modelDigestMatches: boolean;
}

/** Re-runs a receipt's prompt tokens with its sampler parameters and seed on `model`, and compares the output. */
export async function replayReceipt(model: Model, statement: ReceiptStatement): Promise<ReplayReport> {
  if (!statement.prompt?.tokens) throw new Error('the receipt holds only a hash of the prompt tokens: it cannot be replayed');
  const result = await model.generate(statement.prompt.tokens, samplingFromReceipt(statement)).result;
  const facts = await modelFacts(model.path);
  const actual = result.tokens;
  const modelDigestMatches = facts.sha256 === statement.model.sha256;
  const expected = statement.output.tokens;
  if (!expected) {
    const identical = tokensSha256(actual) === statement.output.sha256;
    return { identical, tokens: actual, modelDigestMatches };
  }
  const n = Math.max(expected.length, actual.length);
  for (let i = 0; i < n; i++) {
    if (expected[i] !== actual[i]) {
      return { identical: false, tokens: actual, modelDigestMatches, firstDivergence: { index: i, expected: expected[i] ?? null, actual: actual[i] ?? null } };
    }
  }
  return { identical: true, tokens: actual, modelDigestMatches };
}
