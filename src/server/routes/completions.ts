/** POST /v1/completions: raw prompts (text or token ids, one or several), streamed or whole. */
import type { FastifyInstance } from 'fastify';
import { ChoiceGroup } from '../choices.js';
import { CLIENT_CLOSED, generatingModel, holdGenerator, newId, reportable, unixNow, type RouteContext } from '../context.js';
import { invalidRequest, toApiError } from '../errors.js';
import { asBody, boolean, choiceSeed, finishReason, parseCommon } from '../params.js';
import { SSE_DONE, sendSse, sseEvent } from '../sse.js';
import { createReceipt } from '../../verify/receipt.js';
import { parseReceiptParam } from '../../verify/server.js';
import type { GenerationResult } from '../../generation.js';
import { Model } from '../../model.js';

/** Prompts per request (each is generated n times). */
export const MAX_PROMPTS = 32;

type Prompt = string | number[];

const isTokenArray = (v: unknown): v is number[] => Array.isArray(v) && v.length > 0 && v.every((t) => Number.isInteger(t));

export function parsePrompts(value: unknown): Prompt[] {
  let prompts: unknown[];
  if (typeof value === 'string' || isTokenArray(value)) prompts = [value];
  else if (Array.isArray(value) && value.length > 0) prompts = value;
  else throw invalidRequest('prompt', "Missing required parameter: 'prompt' (a string, an array of strings, or token ids).", 'missing_required_parameter');
  if (prompts.length > MAX_PROMPTS) throw invalidRequest('prompt', `At most ${MAX_PROMPTS} prompts per request, got ${prompts.length}.`);
  return prompts.map((p, i) => {
    if (typeof p === 'string' || isTokenArray(p)) return p;
    throw invalidRequest('prompt', `prompt[${i}] must be a string or a non-empty array of token ids.`);
  });
}

export function completionRoutes(app: FastifyInstance, ctx: RouteContext): void {
  app.post('/v1/completions', async (request, reply) => {
    const body = asBody(request.body);
    const params = parseCommon(body, ctx.limits);
    const prompts = parsePrompts(body['prompt']);
    const echo = boolean(body, 'echo') ?? false;
    const suffix = body['suffix'];
    if (suffix !== undefined && suffix !== null && suffix !== '') {
      throw invalidRequest('suffix', "'suffix' (fill-in-the-middle) is not supported by this server.", 'unsupported_parameter');
    }
    const bestOf = body['best_of'];
    if (bestOf !== undefined && bestOf !== null && bestOf !== 1 && bestOf !== params.n) {
      throw invalidRequest('best_of', "'best_of' other than n is not supported by this server.", 'unsupported_parameter');
    }
    const receiptOptions = parseReceiptParam(body, prompts.length * params.n);
    const served = generatingModel(ctx, body, params.model);
    const loaded = await holdGenerator(served, reply);
    // Receipts name one model file: a fused model refuses them (generatingModel), so with one, loaded is a Model.
    const receiptModel = loaded instanceof Model ? loaded : undefined;
    const { n } = params;
    const controller = ctx.requestController(request, reply);
    let group: ChoiceGroup;
    let echoed: string[] = [];
    // With a receipt the prompt is tokenized here (as generate() does) so that the receipt names its exact ids.
    let promptTokens: number[] = [];
    const startedAt = new Date();
    try {
      if (echo) echoed = prompts.map((p) => (typeof p === 'string' ? p : loaded.detokenize(p)));
      // Choice index = prompt index × n + i, as OpenAI numbers them.
      group = ChoiceGroup.start(
        prompts.length * n,
        controller,
        (index, signal) => {
          let prompt = prompts[Math.floor(index / n)]!;
          if (receiptOptions) {
            promptTokens = typeof prompt === 'string' ? loaded.tokenize(prompt, { addSpecial: true, parseSpecial: true }) : [...prompt];
            prompt = promptTokens;
          }
          return loaded.generate(prompt, { ...params.sampling, seed: choiceSeed(params.sampling.seed, index % n), signal });
        },
        { metrics: ctx.metrics, model: served.name },
      );
    } catch (error) {
      throw toApiError(error, 'prompt');
    }
    const id = newId('cmpl');
    const created = unixNow();
    const model = served.name;
    const receiptFor = async (result: GenerationResult) =>
      receiptOptions && receiptModel
        ? { receipt: await createReceipt(receiptModel, { promptTokens, options: params.sampling, result, startedAt }, receiptOptions) }
        : {};
    const promptOf = (index: number) => Math.floor(index / n);
    const usage = (results: Array<{ usage: { promptTokens: number; completionTokens: number } } | undefined>) => {
      let promptTokens = 0;
      let completionTokens = 0;
      results.forEach((r, index) => {
        if (!r) return;
        if (index % n === 0) promptTokens += r.usage.promptTokens; // each prompt counted once
        completionTokens += r.usage.completionTokens;
      });
      return { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens };
    };

    if (!params.stream) {
      let results;
      try {
        results = await group.results();
      } catch (error) {
        throw reportable(controller, error, 'prompt');
      }
      return {
        id,
        object: 'text_completion',
        created,
        model,
        choices: results.map((r, index) => ({
          index,
          text: echo ? echoed[promptOf(index)]! + r.text : r.text,
          logprobs: null,
          finish_reason: finishReason(r.finishReason),
        })),
        usage: usage(results),
        ...(await receiptFor(results[0]!)),
      };
    }

    const chunk = (choices: unknown[], extra: Record<string, unknown> = {}) =>
      sseEvent({ id, object: 'text_completion', created, model, choices, ...(params.includeUsage ? { usage: null } : {}), ...extra });
    async function* events(): AsyncGenerator<string> {
      if (echo) {
        for (let index = 0; index < prompts.length * n; index++) {
          yield chunk([{ index, text: echoed[promptOf(index)]!, logprobs: null, finish_reason: null }]);
        }
      }
      const results: Array<GenerationResult | undefined> = [];
      for await (const event of group.events()) {
        if (event.kind === 'text') {
          yield chunk([{ index: event.index, text: event.text, logprobs: null, finish_reason: null }]);
        } else if (event.kind === 'done') {
          results[event.index] = event.result;
          yield chunk([{ index: event.index, text: '', logprobs: null, finish_reason: finishReason(event.result.finishReason) }]);
        } else {
          const failure = reportable(controller, event.error, 'prompt');
          if (failure.status !== CLIENT_CLOSED) yield sseEvent(failure.body());
          return;
        }
      }
      const receipt = receiptOptions && results[0] ? await receiptFor(results[0]) : {};
      if (params.includeUsage) yield chunk([], { usage: usage(results), ...receipt });
      else if (receiptOptions) yield chunk([], receipt);
      yield SSE_DONE;
    }
    return sendSse(reply, events());
  });
}
