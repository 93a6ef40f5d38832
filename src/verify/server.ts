/**
 * Server side of receipts (our extension of the OpenAI API):
 *   - `"receipt": true` (or `{ "tokens": "hash" }`) in a chat/completions request body adds a
 *     `receipt` field (a DSSE envelope) to the response, or to the final stream chunk;
 *   - `POST /v1/receipts/verify` with `{ receipt, public_key?, model? }` (or a bare envelope)
 *     answers `{ valid, reasons, key_id, statement }`; `model` names a served model whose file's
 *     digest must match.
 */
import type { FastifyInstance } from 'fastify';
import type { RouteContext } from '../server/context.js';
import { invalidRequest } from '../server/errors.js';
import { verifyReceipt, type ReceiptOptions } from './receipt.js';

/** The request's `receipt` parameter: undefined when no receipt is wanted. */
export function parseReceiptParam(body: Record<string, unknown>, choices: number): ReceiptOptions | undefined {
  const value = body['receipt'];
  if (value === undefined || value === null || value === false) return undefined;
  let options: ReceiptOptions;
  if (value === true) options = {};
  else if (typeof value === 'object' && !Array.isArray(value)) {
    const tokens = (value as { tokens?: unknown }).tokens;
    if (tokens !== undefined && tokens !== 'ids' && tokens !== 'hash') throw invalidRequest('receipt.tokens', "'receipt.tokens' must be 'ids' or 'hash'.");
    options = { tokens: tokens as 'ids' | 'hash' | undefined };
  } else {
    throw invalidRequest('receipt', "'receipt' must be true, false or { tokens: 'ids' | 'hash' }.");
  }
  if (choices !== 1) throw invalidRequest('receipt', "'receipt' needs exactly one choice (n = 1 and a single prompt).", 'unsupported_parameter');
  return options;
}

export function receiptRoutes(app: FastifyInstance, ctx: RouteContext): void {
  app.post('/v1/receipts/verify', async (request) => {
    const body = request.body as Record<string, unknown> | null;
    if (!body || typeof body !== 'object') throw invalidRequest(null, 'The body must be a receipt envelope or { receipt, public_key?, model? }.');
    const envelope = 'payload' in body ? body : body['receipt'];
    const publicKey = body['public_key'];
    if (publicKey !== undefined && typeof publicKey !== 'string') throw invalidRequest('public_key', "'public_key' must be a PEM string.");
    const modelName = body['model'];
    if (modelName !== undefined && typeof modelName !== 'string') throw invalidRequest('model', "'model' must be a served model's name.");
    const modelPath = modelName !== undefined && 'payload' in body === false ? ctx.models.get(modelName).path : undefined;
    let check;
    try {
      check = await verifyReceipt(envelope, { publicKey, modelPath });
    } catch (error) {
      throw invalidRequest('public_key', `Cannot verify: ${(error as Error).message}`);
    }
    return { object: 'receipt.verification', valid: check.valid, reasons: check.reasons, key_id: check.keyId ?? null, statement: check.statement ?? null };
  });
}
