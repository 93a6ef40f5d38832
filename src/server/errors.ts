/**
 * Errors in OpenAI's shape, `{ error: { message, type, param, code } }`, with the HTTP status each
 * kind deserves. Route code throws ApiError; runtime errors (GenesisError) and Fastify's own errors
 * (body too large, bad JSON) are translated by `toApiError`.
 */
import { ContextOverflowError, DisposedError, GenesisError, InvalidOptionError,
  MemoryBudgetError, QueueFullError, RpcError } from '../errors.js';

export type ApiErrorType =
  | 'invalid_request_error'
  | 'authentication_error'
  | 'not_found_error'
  | 'rate_limit_error'
  | 'server_error'
  | 'service_unavailable';

export interface ApiErrorBody {
  error: { message: string; type: ApiErrorType; param: string | null; code: string | null };
}

export class ApiError extends Error {
  readonly status: number;
  readonly type: ApiErrorType;
  readonly param: string | null;
  readonly code: string | null;
  /** Extra response headers (Retry-After, WWW-Authenticate). */
  readonly headers: Record<string, string>;

  constructor(
    status: number,
    type: ApiErrorType,
    message: string,
    options: { param?: string | null; code?: string | null; headers?: Record<string, string> } = {},
  ) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.type = type;
    this.param = options.param ?? null;
    this.code = options.code ?? null;
    this.headers = options.headers ?? {};
  }

  body(): ApiErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** A server set up wrongly (no API key off loopback, a bad --fuse, ...): refused before it serves. */
export class ServerConfigError extends Error {
  override name = 'ServerConfigError';
}

export function invalidRequest(param: string | null, message: string, code: string | null = 'invalid_value'): ApiError {
  return new ApiError(400, 'invalid_request_error', message, { param, code });
}

export function modelNotFound(model: string, available: readonly string[]): ApiError {
  return new ApiError(404, 'invalid_request_error', `The model ${JSON.stringify(model)} does not exist. Available: ${available.join(', ') || 'none'}.`, {
    param: 'model',
    code: 'model_not_found',
  });
}

/** Seconds a client should wait after a 429 (the queue drains at token speed: a second is plenty). */
export const RETRY_AFTER_SECONDS = 1;

/**
 * Runtime option names → the request parameter a client sent. `fallback` names the parameter the
 * prompt came in (messages or prompt) for errors about the prompt itself.
 */
const OPTION_PARAMS: Record<string, string> = {
  maxTokens: 'max_tokens',
  temperature: 'temperature',
  topK: 'top_k',
  topP: 'top_p',
  minP: 'min_p',
  repeatPenalty: 'repeat_penalty',
  frequencyPenalty: 'frequency_penalty',
  presencePenalty: 'presence_penalty',
  logitBias: 'logit_bias',
  seed: 'seed',
  stop: 'stop',
  grammar: 'response_format',
  input: 'input',
};

function optionParam(option: string, fallback: string): string {
  const base = option.replace(/\[.*$/, '');
  if (base === 'prompt' || base === 'messages' || base === 'text') return fallback;
  if (base === 'logitBias') return 'logit_bias';
  if (base === 'input') return option; // input[3]: already the request's name
  return OPTION_PARAMS[base] ?? option;
}

/** Any thrown value → ApiError. `promptParam` names where the prompt came from ('messages', 'prompt', 'input'). */
export function toApiError(error: unknown, promptParam = 'prompt'): ApiError {
  if (error instanceof ApiError) return error;
  if (error instanceof ContextOverflowError) {
    return new ApiError(400, 'invalid_request_error', error.message, { param: promptParam, code: 'context_length_exceeded' });
  }
  if (error instanceof InvalidOptionError) {
    return new ApiError(400, 'invalid_request_error', error.message, { param: optionParam(error.option, promptParam), code: 'invalid_value' });
  }
  if (error instanceof QueueFullError) {
    return new ApiError(429, 'rate_limit_error', `The server is busy: ${error.message}. Retry after ${RETRY_AFTER_SECONDS} s.`, {
      code: 'queue_full',
      headers: { 'retry-after': String(RETRY_AFTER_SECONDS) },
    });
  }
  if (error instanceof MemoryBudgetError) {
    return new ApiError(503, 'service_unavailable', `The model cannot be loaded now: ${error.message}`, { code: 'memory_budget', headers: { 'retry-after': String(RETRY_AFTER_SECONDS) } });
  }
  if (error instanceof RpcError) {
    // A remote device of the model is down: the runtime reloads the model once it is back.
    return new ApiError(503, 'service_unavailable', `The model is unavailable: ${error.message}`, {
      code: error.code.toLowerCase(),
      headers: { 'retry-after': String(RETRY_AFTER_SECONDS) },
    });
  }
  if (error instanceof DisposedError) {
    return new ApiError(503, 'service_unavailable', 'The model is shutting down.', { code: 'model_unavailable' });
  }
  if (error instanceof GenesisError) {
    if (error.code === 'CHAT_TEMPLATE' || error.code === 'TOKENIZE') {
      return new ApiError(400, 'invalid_request_error', error.message, { param: promptParam, code: error.code.toLowerCase() });
    }
    return new ApiError(500, 'server_error', error.message, { code: error.code.toLowerCase() });
  }
  // Fastify's own errors carry a statusCode and an FST_ code.
  const fst = error as { statusCode?: number; code?: string; message?: string };
  if (typeof fst.statusCode === 'number' && fst.statusCode >= 400 && fst.statusCode < 500) {
    if (fst.statusCode === 413 || fst.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
      return new ApiError(413, 'invalid_request_error', 'The request body is larger than the server accepts.', { code: 'request_too_large' });
    }
    if (fst.statusCode === 415) {
      return new ApiError(415, 'invalid_request_error', `${fst.message ?? 'Unsupported media type'}: send Content-Type: application/json.`, {
        code: 'unsupported_media_type',
      });
    }
    return new ApiError(fst.statusCode, 'invalid_request_error', fst.message ?? 'Bad request', { code: 'invalid_request' });
  }
  return new ApiError(500, 'server_error', 'The server had an error while processing the request.', { code: 'internal_error' });
}
