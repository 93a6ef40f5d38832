/** POST /v1/embeddings: model.embed(), as float arrays or base64 (the openai client asks for base64). */
import type { FastifyInstance } from 'fastify';
import { holdModel, type RouteContext } from '../context.js';
import { invalidRequest, toApiError } from '../errors.js';
import { asBody } from '../params.js';

export const MAX_EMBEDDING_INPUTS = 2048;

function parseInput(value: unknown): string[] {
  const inputs = typeof value === 'string' ? [value] : value;
  if (!Array.isArray(inputs) || inputs.length === 0) {
    throw invalidRequest('input', "Missing required parameter: 'input' (a string or a non-empty array of strings).", 'missing_required_parameter');
  }
  if (inputs.length > MAX_EMBEDDING_INPUTS) throw invalidRequest('input', `At most ${MAX_EMBEDDING_INPUTS} inputs per request, got ${inputs.length}.`);
  inputs.forEach((text: unknown, i) => {
    if (typeof text !== 'string') {
      throw invalidRequest(`input[${i}]`, `input[${i}] must be a string (token-id inputs are not supported by this server).`, 'unsupported_value');
    }
    if (text.length === 0) throw invalidRequest(`input[${i}]`, `input[${i}] is empty.`);
  });
  return inputs as string[];
}

function base64(vector: readonly number[]): string {
  const floats = Float32Array.from(vector);
  return Buffer.from(floats.buffer, floats.byteOffset, floats.byteLength).toString('base64');
}

export function embeddingRoutes(app: FastifyInstance, ctx: RouteContext): void {
  app.post('/v1/embeddings', async (request, reply) => {
    const body = asBody(request.body);
    const name = body['model'];
    if (typeof name !== 'string' || name.length === 0) {
      throw invalidRequest('model', "Missing required parameter: 'model' (the name of a model from GET /v1/models).", 'missing_required_parameter');
    }
    const input = parseInput(body['input']);
    const format = body['encoding_format'] ?? 'float';
    if (format !== 'float' && format !== 'base64') {
      throw invalidRequest('encoding_format', `Invalid value for 'encoding_format': expected 'float' or 'base64', got ${JSON.stringify(format)}.`);
    }
    const served = ctx.models.get(name);
    const model = await holdModel(served, reply);
    const dimensions = body['dimensions'];
    if (dimensions !== undefined && dimensions !== null && dimensions !== model.info.embeddingLength) {
      throw invalidRequest('dimensions', `This model's embeddings have ${model.info.embeddingLength} dimensions; other sizes are not supported.`, 'unsupported_value');
    }
    let result;
    try {
      result = await model.embed(input);
    } catch (error) {
      throw toApiError(error, 'input');
    }
    ctx.metrics.promptTokens.inc({ model: served.name }, result.promptTokens);
    return {
      object: 'list',
      data: result.embeddings.map((vector, index) => ({ object: 'embedding', index, embedding: format === 'base64' ? base64(vector) : vector })),
      model: served.name,
      usage: { prompt_tokens: result.promptTokens, total_tokens: result.promptTokens },
    };
  });
}
