/** POST /v1/chat/completions: messages through the model's chat template, streamed or whole. */
import type { FastifyInstance } from 'fastify';
import { Model, type ChatMessage } from '../../model.js';
import { ChoiceGroup } from '../choices.js';
import { CLIENT_CLOSED, generatingModel, holdGenerator, newId, reportable, unixNow, type RouteContext } from '../context.js';
import { invalidRequest, toApiError } from '../errors.js';
import { asBody, choiceSeed, finishReason, parseCommon } from '../params.js';
import { SSE_DONE, sendSse, sseEvent } from '../sse.js';
import { chatPromptTokens, createReceipt } from '../../verify/receipt.js';
import { parseReceiptParam } from '../../verify/server.js';
import type { GenerationResult } from '../../generation.js';

const ROLES = new Set(['system', 'developer', 'user', 'assistant']);

function parseContent(content: unknown, where: string): string {
  if (content === null || content === undefined) return '';
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content
      .map((part: unknown, j) => {
        const p = part as { type?: unknown; text?: unknown };
        if (p && typeof p === 'object' && p.type === 'text' && typeof p.text === 'string') return p.text;
        throw invalidRequest(`${where}.content[${j}]`, `Only text content parts are supported, got ${JSON.stringify(p?.type ?? typeof part)}.`, 'unsupported_content');
      })
      .join('');
  }
  throw invalidRequest(`${where}.content`, 'Message content must be a string or an array of text parts.');
}

export function parseMessages(value: unknown): ChatMessage[] {
  if (!Array.isArray(value) || value.length === 0) {
    throw invalidRequest('messages', "Missing required parameter: 'messages' (a non-empty array of { role, content }).", 'missing_required_parameter');
  }
  return value.map((message: unknown, i) => {
    const where = `messages[${i}]`;
    const m = message as { role?: unknown; content?: unknown };
    if (m === null || typeof m !== 'object') throw invalidRequest(where, 'Each message must be an object { role, content }.');
    if (typeof m.role !== 'string' || !ROLES.has(m.role)) {
      throw invalidRequest(`${where}.role`, `Unsupported role ${JSON.stringify(m.role)}: expected system, developer, user or assistant.`);
    }
    // 'developer' is OpenAI's newer name for the system role.
    return { role: m.role === 'developer' ? 'system' : m.role, content: parseContent(m.content, where) };
  });
}

export function chatRoutes(app: FastifyInstance, ctx: RouteContext): void {
  app.post('/v1/chat/completions', async (request, reply) => {
    const body = asBody(request.body);
    const params = parseCommon(body, ctx.limits);
    const messages = parseMessages(body['messages']);
    const receiptOptions = parseReceiptParam(body, params.n);
    const served = generatingModel(ctx, body, params.model);
    const loaded = await holdGenerator(served, reply);
    // Receipts name one model file: a fused model refuses them (generatingModel), so with one, loaded is a Model.
    const receiptModel = loaded instanceof Model ? loaded : undefined;
    const controller = ctx.requestController(request, reply);
    let group: ChoiceGroup;
    // With a receipt the prompt is tokenized here (as chat() does) so that the receipt names its exact ids.
    let promptTokens: number[] = [];
    const startedAt = new Date();
    try {
      group = ChoiceGroup.start(
        params.n,
        controller,
        (i, signal) => {
          const options = { ...params.sampling, seed: choiceSeed(params.sampling.seed, i), signal };
          if (!receiptOptions || !receiptModel) return loaded.chat(messages, options);
          promptTokens = chatPromptTokens(receiptModel, messages);
          return receiptModel.generate(promptTokens, options);
        },
        { metrics: ctx.metrics, model: served.name },
      );
    } catch (error) {
      throw toApiError(error, 'messages');
    }
    const id = newId('chatcmpl');
    const created = unixNow();
    const model = served.name;
    const receiptFor = async (result: GenerationResult) =>
      receiptOptions && receiptModel
        ? { receipt: await createReceipt(receiptModel, { promptTokens, options: params.sampling, result, startedAt }, receiptOptions) }
        : {};

    if (!params.stream) {
      let results;
      try {
        results = await group.results();
      } catch (error) {
        throw reportable(controller, error, 'messages');
      }
      const completionTokens = results.reduce((n, r) => n + r.usage.completionTokens, 0);
      const promptTokens = results[0]!.usage.promptTokens;
      return {
        id,
        object: 'chat.completion',
        created,
        model,
        choices: results.map((r, index) => ({
          index,
          message: { role: 'assistant', content: r.text, refusal: null },
          logprobs: null,
          finish_reason: finishReason(r.finishReason),
        })),
        usage: { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens },
        ...(await receiptFor(results[0]!)),
      };
    }

    const chunk = (choices: unknown[], extra: Record<string, unknown> = {}) =>
      sseEvent({ id, object: 'chat.completion.chunk', created, model, choices, ...(params.includeUsage ? { usage: null } : {}), ...extra });
    async function* events(): AsyncGenerator<string> {
      for (let index = 0; index < params.n; index++) {
        yield chunk([{ index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }]);
      }
      let promptTokens = 0;
      let completionTokens = 0;
      let lastResult: GenerationResult | undefined;
      for await (const event of group.events()) {
        if (event.kind === 'text') {
          yield chunk([{ index: event.index, delta: { content: event.text }, logprobs: null, finish_reason: null }]);
        } else if (event.kind === 'done') {
          promptTokens = event.result.usage.promptTokens;
          completionTokens += event.result.usage.completionTokens;
          lastResult = event.result;
          yield chunk([{ index: event.index, delta: {}, logprobs: null, finish_reason: finishReason(event.result.finishReason) }]);
        } else {
          const failure = reportable(controller, event.error, 'messages');
          if (failure.status !== CLIENT_CLOSED) yield sseEvent(failure.body());
          return;
        }
      }
      const receipt = receiptOptions && lastResult ? await receiptFor(lastResult) : {};
      if (params.includeUsage) {
        yield chunk([], { usage: { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens }, ...receipt });
      } else if (receiptOptions) {
        yield chunk([], receipt);
      }
      yield SSE_DONE;
    }
    return sendSse(reply, events());
  });
}
