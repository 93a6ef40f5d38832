/** What every route gets from buildServer. */
import { randomUUID } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { ApiError, toApiError } from './errors.js';
import type { ServerMetrics } from './metrics.js';
import type { Model } from '../model.js';
import { isFused, refuseUnfusable, type FusedGenerator, type FusedServedModel } from './fused.js';
import type { ModelRegistry, ServedModel } from './models.js';
import type { Limits } from './params.js';

export interface RouteContext {
  models: ModelRegistry;
  metrics: ServerMetrics;
  limits: Limits;
  /**
   * An AbortController for the request's generations: aborted when the client disconnects before
   * the response is complete, or when a drain runs out of time. Released when the response ends.
   */
  requestController(request: FastifyRequest, reply: FastifyReply): AbortController;
}

/**
 * The served model for this request, loaded if the runtime had unloaded it, held until the
 * response is finished (or the client goes away), then released so the runtime may unload it.
 */
export async function holdModel(served: ServedModel, reply: FastifyReply): Promise<Model> {
  let lease;
  try {
    lease = await served.acquire();
  } catch (error) {
    throw toApiError(error, 'model');
  }
  reply.raw.once('close', lease.release);
  return lease.model;
}

/**
 * The model or fused model a generating request names (404 if none). A fused one refuses, with a
 * 400 naming the parameter, what logit fusion cannot apply (penalties, logit_bias, grammar...).
 */
export function generatingModel(ctx: RouteContext, body: Record<string, unknown>, name: string): ServedModel | FusedServedModel {
  const served = ctx.models.lookup(name);
  if (isFused(served)) refuseUnfusable(served, body);
  return served;
}

/**
 * holdModel() for the generating routes: a fused model holds every member the same way (each
 * loaded if needed, released when the response ends) and generates over them.
 */
export async function holdGenerator(served: ServedModel | FusedServedModel, reply: FastifyReply): Promise<Model | FusedGenerator> {
  if (!isFused(served)) return holdModel(served, reply);
  const models: Model[] = [];
  for (const m of served.members) models.push(await holdModel(m.served, reply));
  return served.generator(models);
}

export function newId(prefix: string): string {
  return `${prefix}-${randomUUID().replace(/-/g, '')}`;
}

export function unixNow(): number {
  return Math.floor(Date.now() / 1000);
}

/** Status of a request whose client went away first (nginx's convention); nobody receives it. */
export const CLIENT_CLOSED = 499;

/**
 * The error to report for a failed generation. A drain that ran out of time aborts with an ApiError
 * (503) as the reason; a client that disconnected gets a 499 that is never sent (and not logged as
 * a server error).
 */
export function reportable(controller: AbortController, error: unknown, promptParam: string): ApiError {
  if (controller.signal.aborted) {
    if (controller.signal.reason instanceof ApiError) return controller.signal.reason;
    return new ApiError(CLIENT_CLOSED, 'invalid_request_error', 'The client closed the connection.', { code: 'client_closed_request' });
  }
  return toApiError(error, promptParam);
}
