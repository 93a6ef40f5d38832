/** What every route gets from buildServer. */
import { randomUUID } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { ApiError, toApiError } from './errors.js';
import type { ServerMetrics } from './metrics.js';
import type { Model } from '../model.js';
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
