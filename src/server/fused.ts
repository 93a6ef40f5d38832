/**
 * Fused virtual models: a name the server answers as it answers a model's, whose tokens the served
 * models it names choose together by logit fusion (src/fusion.ts), each with its weight.
 *
 *   buildServer({ models: [{ name: 'a', model: a }, { name: 'b', model: b }],
 *                 fused: [{ name: 'duo', members: [{ model: 'a', weight: 0.7 }, { model: 'b', weight: 0.3 }] }] });
 *
 * The generating routes hold every member for the request (as runtime.fuse() does for each of its
 * generations) and generate through a FusedGenerator, which the routes use as they use a Model:
 * the first member tokenizes, detokenizes and formats chat messages with its template.
 */
import { createHash } from 'node:crypto';

import { DisposedError, InvalidOptionError } from '../errors.js';
import { fuse, type FusedModel } from '../fusion.js';
import type { Generation } from '../generation.js';
import { readGguf } from '../gguf/index.js';
import type { ChatMessage, Model } from '../model.js';
import type { ChatOptions, GenerateOptions } from '../options.js';
import { chatPromptTokens } from '../verify/receipt.js';
import { ApiError, invalidRequest, ServerConfigError } from './errors.js';
import type { ServedModel } from './models.js';

export interface FusedModelSpec {
  /** The name requests use; not the name of a served model. */
  name: string;
  /**
   * Served models by name, with weights ≥ 0 (at least one > 0; they need not sum to 1). The first
   * member's tokenizer and chat template serve the fused model; all must share the tokenizer.
   */
  members: Array<{ model: string; weight: number }>;
}

export interface FusedServedModel {
  readonly name: string;
  readonly members: ReadonlyArray<{ served: ServedModel; weight: number }>;
  /** Unix seconds when the server started serving it. */
  readonly created: number;
  /** Some member has random weights (the built-in demo). */
  readonly randomWeights: boolean;
  /** The generator over the members' models, held by the caller for one request. */
  generator(models: readonly Model[]): FusedGenerator;
}

export function isFused(served: ServedModel | FusedServedModel): served is FusedServedModel {
  return 'members' in served;
}

/** Checks declarations against the served models' names: ServerConfigError naming what is wrong. */
export function checkFusedSpecs(specs: readonly FusedModelSpec[], served: readonly string[]): void {
  const names = new Set<string>();
  for (const spec of specs) {
    if (spec === null || typeof spec !== 'object' || typeof spec.name !== 'string' || spec.name.length === 0) {
      throw new ServerConfigError('every fused model needs a non-empty name (--fuse NAME=MODEL:WEIGHT,MODEL:WEIGHT)');
    }
    const what = `fused model ${JSON.stringify(spec.name)}`;
    if (served.includes(spec.name)) throw new ServerConfigError(`${what}: a served model already has that name; give the fused model a name of its own`);
    if (names.has(spec.name)) throw new ServerConfigError(`two fused models are named ${JSON.stringify(spec.name)}: names must be unique`);
    names.add(spec.name);
    if (!Array.isArray(spec.members) || spec.members.length === 0) throw new ServerConfigError(`${what} needs at least one member (MODEL:WEIGHT)`);
    for (const m of spec.members) {
      const member = JSON.stringify(m?.model);
      if (typeof m?.model !== 'string' || !served.includes(m.model)) {
        const fused = specs.some((s) => s.name === m?.model) ? ' (a fused model cannot be a member)' : '';
        throw new ServerConfigError(`${what}: member ${member} is not a served model${fused}; served: ${served.join(', ')}`);
      }
      if (typeof m.weight !== 'number' || !Number.isFinite(m.weight) || m.weight < 0) {
        throw new ServerConfigError(`${what}: member ${member} has weight ${String(m.weight)}; expected a finite number ≥ 0`);
      }
    }
    if (!spec.members.some((m) => m.weight > 0)) throw new ServerConfigError(`${what}: every weight is 0; at least one member must have a weight > 0`);
  }
}

/**
 * Every member must share the first one's tokenizer. `digest(name)` gives a model's tokenizer
 * digest, or undefined where it cannot be known yet (a runtime model not loaded: serve() compares
 * those from their files before loading).
 */
export function checkFusedTokenizers(spec: FusedModelSpec, digest: (model: string) => string | undefined): void {
  const first = spec.members[0]!.model;
  const expected = digest(first);
  if (expected === undefined) return;
  for (const m of spec.members.slice(1)) {
    const other = digest(m.model);
    if (other !== undefined && other !== expected) {
      throw new ServerConfigError(
        `fused model ${JSON.stringify(spec.name)}: ${JSON.stringify(m.model)} does not have the tokenizer of ${JSON.stringify(first)} ` +
          `(${other} against ${expected}); logit fusion needs members with the same tokenizer`,
      );
    }
  }
}

/** A digest of a GGUF file's tokenizer (its type and every token's text), read without loading the model. */
export async function ggufTokenizerDigest(path: string): Promise<string> {
  const gguf = await readGguf(path);
  const type = gguf.metadata.get('tokenizer.ggml.model');
  const tokens = gguf.metadata.get('tokenizer.ggml.tokens');
  const list = tokens?.type === 'array' && tokens.itemType === 'string' ? (tokens.value as string[]) : [];
  const hash = createHash('sha256').update(`${type?.type === 'string' ? type.value : ''}\0`);
  for (const t of list) hash.update(`${t}\0`);
  return `${list.length}:${hash.digest('hex').slice(0, 16)}`;
}

export function makeFusedServedModel(spec: FusedModelSpec, served: (name: string) => ServedModel, created: number): FusedServedModel {
  const members = spec.members.map((m) => ({ served: served(m.model), weight: m.weight }));
  // One FusedModel per set of member models: rebuilt only when a runtime reloaded one.
  let cached: { models: readonly Model[]; generator: FusedGenerator } | undefined;
  return {
    name: spec.name,
    members,
    created,
    randomWeights: members.some((m) => m.served.randomWeights),
    generator(models) {
      // A member disposed under the request (the server is stopping): 503, as for a model alone.
      if (models.some((m) => m.disposed)) throw new DisposedError();
      if (cached && cached.models.length === models.length && cached.models.every((m, i) => m === models[i])) return cached.generator;
      let generator: FusedGenerator;
      try {
        generator = new FusedGenerator(models.map((model, i) => ({ model, weight: members[i]!.weight })));
      } catch (error) {
        // The declaration was checked at start-up; a runtime model can still be swapped under its name.
        if (error instanceof InvalidOptionError) {
          throw new ApiError(500, 'server_error', `The fused model ${JSON.stringify(spec.name)} cannot run: ${error.message}`, { code: 'fused_model_invalid' });
        }
        throw error;
      }
      cached = { models: [...models], generator };
      return generator;
    },
  };
}

/**
 * Request parameters logit fusion cannot apply, with the values that change nothing (which
 * clients often send by default) let through.
 */
const REFUSED: ReadonlyArray<[param: string, noOp: (v: unknown) => boolean]> = [
  ['presence_penalty', (v) => v === 0],
  ['frequency_penalty', (v) => v === 0],
  ['repeat_penalty', (v) => v === 1],
  ['logit_bias', (v) => typeof v === 'object' && Object.keys(v as object).length === 0],
  ['response_format', (v) => (v as { type?: unknown }).type === 'text'],
  ['grammar', () => false],
  ['receipt', (v) => v === false],
];

/** 400 unsupported_parameter for a parameter the fused model cannot apply, naming it. */
export function refuseUnfusable(fused: FusedServedModel, body: Record<string, unknown>): void {
  for (const [param, noOp] of REFUSED) {
    const v = body[param];
    if (v === undefined || v === null || noOp(v)) continue;
    const why =
      param === 'receipt'
        ? 'a receipt names one model file'
        : "logit fusion samples the members' combined distribution itself: temperature, top_p, top_k, min_p, seed, stop and max_tokens apply; penalties, logit_bias, grammar and response_format do not";
    throw invalidRequest(param, `'${param}' is not available with the fused model ${JSON.stringify(fused.name)}: ${why}.`, 'unsupported_parameter');
  }
}

/** Sampling options that change nothing, dropped so that fuse() does not refuse them. */
function withoutNoOps(options: GenerateOptions): GenerateOptions {
  const out = { ...options };
  if (out.presencePenalty === 0) delete out.presencePenalty;
  if (out.frequencyPenalty === 0) delete out.frequencyPenalty;
  if (out.repeatPenalty === 1) delete out.repeatPenalty;
  const bias = out.logitBias;
  if (bias !== undefined && (bias instanceof Map ? bias.size : Array.isArray(bias) ? bias.length : Object.keys(bias).length) === 0) delete out.logitBias;
  return out;
}

/** A fused model as the generating routes use a Model: generate, chat, tokenize, detokenize. */
export class FusedGenerator {
  readonly #fused: FusedModel;
  readonly #first: Model;

  constructor(members: Array<{ model: Model; weight: number }>) {
    this.#fused = fuse(members);
    this.#first = members[0]!.model;
  }

  generate(prompt: string | readonly number[], options: GenerateOptions = {}): Generation {
    return this.#fused.generate(prompt, withoutNoOps(options));
  }

  /** The first member's chat template formats the messages (and the BOS rule of Model.chat applies). */
  chat(messages: ChatMessage[], options: ChatOptions = {}): Generation {
    const { chatTemplate, ...rest } = options;
    return this.generate(chatPromptTokens(this.#first, messages, chatTemplate), rest);
  }

  tokenize(text: string, options?: { addSpecial?: boolean; parseSpecial?: boolean }): number[] {
    return this.#first.tokenize(text, options);
  }

  detokenize(tokens: readonly number[], options?: { removeSpecial?: boolean; renderSpecial?: boolean }): string {
    return this.#first.detokenize(tokens, options);
  }
}
