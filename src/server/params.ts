/**
 * Request parameters shared by /v1/chat/completions and /v1/completions, validated with the name
 * of the offending parameter (400 invalid_request_error, `param` set), then turned into the
 * runtime's SamplingOptions.
 */
import type { SamplingOptions } from '../options.js';
import { InvalidOptionError } from '../errors.js';
import { JSON_OBJECT_GBNF, jsonSchemaToGbnf } from '../grammar/index.js';
import { invalidRequest, toApiError } from './errors.js';

export interface Limits {
  /** Largest max_tokens a request may ask for; also the default when it asks for none. */
  maxTokensLimit: number;
  /** Largest n (choices per request). */
  maxChoices: number;
}

export interface CommonParams {
  model: string;
  stream: boolean;
  includeUsage: boolean;
  n: number;
  /** Per-choice sampling options (choice i gets seed + i when a seed is given). */
  sampling: SamplingOptions;
}

type Body = Record<string, unknown>;

export function asBody(body: unknown): Body {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw invalidRequest(null, 'The request body must be a JSON object.', 'invalid_body');
  }
  return body as Body;
}

const present = (v: unknown): boolean => v !== undefined && v !== null;

function describe(v: unknown): string {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

export function number(body: Body, param: string, min: number, max: number): number | undefined {
  const v = body[param];
  if (!present(v)) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) {
    throw invalidRequest(param, `Invalid value for '${param}': expected a number in [${min}, ${max}], got ${describe(v)}.`);
  }
  return v;
}

export function integer(body: Body, param: string, min: number, max: number): number | undefined {
  const v = body[param];
  if (!present(v)) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw invalidRequest(param, `Invalid value for '${param}': expected an integer in [${min}, ${max}], got ${describe(v)}.`);
  }
  return v;
}

export function boolean(body: Body, param: string): boolean | undefined {
  const v = body[param];
  if (!present(v)) return undefined;
  if (typeof v !== 'boolean') throw invalidRequest(param, `Invalid value for '${param}': expected true or false, got ${describe(v)}.`);
  return v;
}

function unsupported(body: Body, param: string, allowed: (v: unknown) => boolean, why: string): void {
  const v = body[param];
  if (present(v) && !allowed(v)) throw invalidRequest(param, `'${param}' is not supported by this server: ${why}.`, 'unsupported_parameter');
}

function parseStop(body: Body): string[] | undefined {
  const v = body['stop'];
  if (!present(v)) return undefined;
  const list = typeof v === 'string' ? [v] : v;
  if (!Array.isArray(list) || list.length > 16 || list.some((s) => typeof s !== 'string' || s.length === 0)) {
    throw invalidRequest('stop', `Invalid value for 'stop': expected a non-empty string or an array of up to 16 non-empty strings, got ${describe(v)}.`);
  }
  return list as string[];
}

function parseLogitBias(body: Body): Record<number, number> | undefined {
  const v = body['logit_bias'];
  if (!present(v)) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) {
    throw invalidRequest('logit_bias', `Invalid value for 'logit_bias': expected an object mapping token ids to biases, got ${describe(v)}.`);
  }
  const out: Record<number, number> = {};
  for (const [key, bias] of Object.entries(v as Record<string, unknown>)) {
    if (!/^\d+$/.test(key)) throw invalidRequest('logit_bias', `Invalid key in 'logit_bias': ${describe(key)} is not a token id.`);
    if (typeof bias !== 'number' || !Number.isFinite(bias) || bias < -100 || bias > 100) {
      throw invalidRequest('logit_bias', `Invalid value in 'logit_bias' for token ${key}: expected a number in [-100, 100], got ${describe(bias)}.`);
    }
    out[Number(key)] = bias;
  }
  return out;
}

/** response_format → a GBNF grammar (json_object: any JSON object; json_schema: that schema). */
function parseResponseFormat(body: Body): string | undefined {
  const v = body['response_format'];
  if (!present(v)) return undefined;
  const format = v as { type?: unknown; json_schema?: { name?: unknown; schema?: unknown } };
  if (typeof v !== 'object' || Array.isArray(v)) {
    throw invalidRequest('response_format', `Invalid value for 'response_format': expected an object with a type, got ${describe(v)}.`);
  }
  switch (format.type) {
    case 'text':
      return undefined;
    case 'json_object':
      return JSON_OBJECT_GBNF;
    case 'json_schema': {
      const spec = format.json_schema;
      if (spec === null || typeof spec !== 'object' || !present(spec.schema)) {
        throw invalidRequest('response_format', "response_format of type 'json_schema' needs json_schema: { name, schema }.");
      }
      try {
        return jsonSchemaToGbnf(spec.schema, { option: 'response_format.json_schema.schema', ...(typeof spec.name === 'string' ? { name: spec.name } : {}) });
      } catch (error) {
        if (error instanceof InvalidOptionError) {
          const param = error.option.startsWith('response_format') ? error.option : 'response_format';
          throw invalidRequest(param, `Unsupported JSON schema in response_format: ${error.message}`, 'unsupported_schema');
        }
        throw toApiError(error);
      }
    }
    default:
      throw invalidRequest('response_format', `Invalid response_format type ${describe(format.type)}: expected 'text', 'json_object' or 'json_schema'.`);
  }
}

/** Seeds are uint32 in the runtime; OpenAI allows any integer: reduce modulo 2^32. */
export function choiceSeed(seed: number | undefined, choice: number): number | undefined {
  if (seed === undefined) return undefined;
  return (((seed + choice) % 2 ** 32) + 2 ** 32) % 2 ** 32;
}

export function parseCommon(body: Body, limits: Limits): CommonParams {
  const model = body['model'];
  if (typeof model !== 'string' || model.length === 0) {
    throw invalidRequest('model', "Missing required parameter: 'model' (the name of a model from GET /v1/models).", 'missing_required_parameter');
  }
  const stream = boolean(body, 'stream') ?? false;
  let includeUsage = false;
  const streamOptions = body['stream_options'];
  if (present(streamOptions)) {
    if (!stream) throw invalidRequest('stream_options', "'stream_options' is only allowed when 'stream' is true.");
    if (typeof streamOptions !== 'object' || Array.isArray(streamOptions)) {
      throw invalidRequest('stream_options', `Invalid value for 'stream_options': expected an object, got ${describe(streamOptions)}.`);
    }
    includeUsage = boolean(streamOptions as Body, 'include_usage') ?? false;
  }
  const n = integer(body, 'n', 1, limits.maxChoices) ?? 1;

  const maxCompletion = integer(body, 'max_completion_tokens', 1, Number.MAX_SAFE_INTEGER);
  const maxTokensParam = maxCompletion !== undefined ? 'max_completion_tokens' : 'max_tokens';
  const maxTokens = maxCompletion ?? integer(body, 'max_tokens', 1, Number.MAX_SAFE_INTEGER);
  if (maxTokens !== undefined && maxTokens > limits.maxTokensLimit) {
    throw invalidRequest(
      maxTokensParam,
      `Invalid value for '${maxTokensParam}': ${maxTokens} is more than this server allows (${limits.maxTokensLimit}).`,
    );
  }

  unsupported(body, 'logprobs', (v) => v === false || v === 0, 'log probabilities are not returned');
  unsupported(body, 'top_logprobs', (v) => v === 0, 'log probabilities are not returned');
  unsupported(body, 'tools', (v) => Array.isArray(v) && v.length === 0, 'tool calls are not implemented');
  unsupported(body, 'functions', (v) => Array.isArray(v) && v.length === 0, 'function calls are not implemented');

  const seed = integer(body, 'seed', Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
  let grammar = parseResponseFormat(body);
  const rawGrammar = body['grammar'];
  if (present(rawGrammar)) {
    if (grammar !== undefined) throw invalidRequest('grammar', "Give either 'grammar' or a JSON 'response_format', not both.");
    if (typeof rawGrammar !== 'string') throw invalidRequest('grammar', `Invalid value for 'grammar': expected a GBNF grammar string, got ${describe(rawGrammar)}.`);
    grammar = rawGrammar;
  }

  const sampling: SamplingOptions = {
    maxTokens: maxTokens ?? limits.maxTokensLimit,
    temperature: number(body, 'temperature', 0, 2),
    topP: number(body, 'top_p', 0, 1),
    presencePenalty: number(body, 'presence_penalty', -2, 2),
    frequencyPenalty: number(body, 'frequency_penalty', -2, 2),
    logitBias: parseLogitBias(body),
    stop: parseStop(body),
    seed: choiceSeed(seed, 0),
    grammar,
    // Extensions in the spirit of llama.cpp's server.
    topK: integer(body, 'top_k', 0, 1 << 30),
    minP: number(body, 'min_p', 0, 1),
    repeatPenalty: number(body, 'repeat_penalty', Number.MIN_VALUE, 100),
    ignoreEos: boolean(body, 'ignore_eos'),
  };
  for (const key of Object.keys(sampling) as Array<keyof SamplingOptions>) if (sampling[key] === undefined) delete sampling[key];
  return { model, stream, includeUsage, n, sampling };
}

/** OpenAI's finish reasons: the runtime's 'eog' and 'stop' are 'stop'; 'length' and 'context' are 'length'. */
export function finishReason(reason: 'eog' | 'stop' | 'length' | 'context'): 'stop' | 'length' {
  return reason === 'eog' || reason === 'stop' ? 'stop' : 'length';
}

