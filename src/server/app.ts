/**
 * buildServer(): the OpenAI-compatible HTTP server (Fastify) over loaded models. It returns the
 * Fastify instance without listening, so the caller (the CLI, a test) chooses the port:
 *
 *   const app = buildServer({ models: [{ name: 'm', model }], host: '127.0.0.1' });
 *   await app.listen({ host: '127.0.0.1', port: 8080 });
 *   ...
 *   await app.drain(); // 503 for new requests, in-flight ones finish, then the server closes
 *
 * The caller owns the models: dispose them after the server is closed.
 */
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify';
import { bearerAuth, isLoopbackHost } from './auth.js';
import type { RouteContext } from './context.js';
import { ApiError, ServerConfigError, toApiError } from './errors.js';
import { ServerMetrics } from './metrics.js';
import type { FusedModelSpec } from './fused.js';
import { ModelRegistry, type ModelsOption } from './models.js';
import { CHAT_PAGE, CHAT_PAGE_CSP } from './page.js';
import { chatRoutes } from './routes/chat.js';
import { completionRoutes } from './routes/completions.js';
import { embeddingRoutes } from './routes/embeddings.js';
import { modelRoutes } from './routes/models.js';
import { receiptRoutes } from '../verify/server.js';
import { statusRoutes } from './routes/status.js';

export { ServerConfigError };

export interface ServerOptions {
  /** Models by name: a Map, or [{ name, model, randomWeights? }]. The request's `model` picks one. */
  models: ModelsOption;
  /**
   * Fused virtual models (logit fusion): each a name of its own that generates with served models
   * of the same tokenizer choosing each token together, weighted. Checked here: a name taken, a
   * member not served, a bad weight or another tokenizer is a ServerConfigError.
   */
  fused?: readonly FusedModelSpec[];
  /**
   * Bearer key(s) for /v1/* and /metrics. Required when `host` is not a loopback address; without
   * one, the server also refuses any request that did not arrive on a loopback address.
   */
  apiKey?: string | readonly string[];
  /** The address the caller will listen on (checked for the API-key rule). Default '127.0.0.1'. */
  host?: string;
  /** Largest request body in bytes (413 beyond). Default 1 MiB. */
  bodyLimit?: number;
  /** Largest max_tokens a request may ask for (400 beyond); the default when it asks for none. Default 4096. */
  maxTokensLimit?: number;
  /** Largest n (choices per request). Default 8. */
  maxChoices?: number;
  /** Default drain() time limit in ms before in-flight generations are cancelled. Default 30 000. */
  drainTimeoutMs?: number;
  /** Node process metrics (memory, CPU, event loop) in /metrics. Default true. */
  processMetrics?: boolean;
  /** Fastify's logger option. Default false. */
  logger?: FastifyServerOptions['logger'];
}

export interface GenesisServerExtras {
  /** The server's Prometheus registry and metrics. */
  readonly metrics: ServerMetrics;
  /** True once drain() was called. */
  readonly draining: boolean;
  /**
   * Graceful stop: new requests get 503, requests in flight finish (cancelled after `timeoutMs`),
   * then the server closes. Idempotent. The models stay loaded: the caller disposes them.
   */
  drain(options?: { timeoutMs?: number }): Promise<void>;
}

export type GenesisServer = FastifyInstance & GenesisServerExtras;

function positiveInt(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < 1) throw new ServerConfigError(`${name} must be a positive integer, got ${value}`);
  return value;
}

/** Routes that stay open without an API key: the chat page (it asks for the key) and the health check. */
const PUBLIC_ROUTES = new Set(['/', '/health', '/favicon.ico']);

export function buildServer(options: ServerOptions): GenesisServer {
  const host = options.host ?? '127.0.0.1';
  const keys = (typeof options.apiKey === 'string' ? [options.apiKey] : [...(options.apiKey ?? [])]).filter((k) => k.length > 0);
  if (keys.length === 0 && !isLoopbackHost(host)) {
    throw new ServerConfigError(
      `refusing to serve on ${host} without an API key: a non-loopback address is reachable from other machines. ` +
        'Give an API key (--api-key or GENESIS_API_KEY), or bind to 127.0.0.1.',
    );
  }
  const bodyLimit = positiveInt('bodyLimit', options.bodyLimit, 1 << 20);
  const limits = {
    maxTokensLimit: positiveInt('maxTokensLimit', options.maxTokensLimit, 4096),
    maxChoices: positiveInt('maxChoices', options.maxChoices, 8),
  };
  const defaultDrainTimeout = options.drainTimeoutMs ?? 30_000;
  const models = new ModelRegistry(options.models, options.fused);
  const authorize = keys.length > 0 ? bearerAuth(keys) : undefined;

  let inFlight = 0;
  let draining = false;
  let drainPromise: Promise<void> | undefined;
  let onIdle: (() => void) | undefined;
  const controllers = new Set<AbortController>();
  const runtime = models.runtime;
  const metrics = new ServerMetrics(() => models.list(), {
    processMetrics: options.processMetrics,
    inFlight: () => inFlight,
    fused: () => models.fused(),
    ...(runtime ? { memory: () => runtime.usage() } : {}),
  });

  const app = Fastify({
    logger: options.logger ?? false,
    bodyLimit,
    // close() destroys every connection still open: drain() waits for the requests in flight
    // first, so what is left are idle keep-alive sockets and sockets a client opened without sending
    // a request, which would otherwise hold close() up until their timeouts (72 s).
    forceCloseConnections: true,
    // While closing, our own onRequest hook answers 503 in OpenAI's shape (draining is set below).
    return503OnClosing: false,
  });

  const ctx: RouteContext = {
    models,
    metrics,
    limits,
    requestController(request, reply) {
      const controller = new AbortController();
      controllers.add(controller);
      const res = reply.raw;
      res.once('close', () => {
        controllers.delete(controller);
        // Closed before the whole response went out: the client is gone, free its sequences now.
        if (!res.writableFinished) controller.abort(new Error('client disconnected'));
      });
      request.raw.once('error', () => controller.abort(new Error('client connection error')));
      // Gone already (while the body was read): 'close' has fired before we listened.
      if (res.destroyed || request.raw.socket.destroyed) controller.abort(new Error('client disconnected'));
      return controller;
    },
  };

  app.addHook('onRequest', async (request, reply) => {
    const started = performance.now();
    inFlight++;
    const res = reply.raw;
    res.once('close', () => {
      inFlight--;
      const endpoint = request.routeOptions.url ?? 'unmatched';
      const status = res.writableFinished ? String(res.statusCode) : '499';
      metrics.requests.inc({ endpoint, method: request.method, status });
      metrics.requestDuration.observe({ endpoint }, (performance.now() - started) / 1000);
      if (inFlight === 0) onIdle?.();
    });
    const route = request.routeOptions.url;
    if (draining && route !== '/health') {
      throw new ApiError(503, 'service_unavailable', 'The server is shutting down and accepts no new requests.', {
        code: 'server_shutting_down',
        headers: { 'retry-after': '5', connection: 'close' },
      });
    }
    if (route !== undefined && PUBLIC_ROUTES.has(route)) return;
    if (authorize) {
      authorize(request.headers.authorization);
    } else if (!isLoopbackHost(request.socket.localAddress ?? '')) {
      // No key was configured because the server was meant for loopback; it is listening wider.
      throw new ApiError(403, 'authentication_error', 'This server has no API key and only answers requests made on a loopback address.', {
        code: 'loopback_only',
      });
    }
  });

  app.addHook('preClose', async () => {
    draining = true;
  });

  app.setErrorHandler((error, request, reply) => {
    const api = toApiError(error);
    if (api.status >= 500 && api.status !== 503) request.log.error({ err: error }, 'request failed');
    return reply.code(api.status).headers(api.headers).send(api.body());
  });

  app.setNotFoundHandler((request, reply) => {
    const api = new ApiError(404, 'invalid_request_error', `Unknown endpoint: ${request.method} ${request.url.split('?')[0]}`, {
      code: 'unknown_url',
    });
    return reply.code(404).send(api.body());
  });

  app.get('/', async (_request, reply) =>
    reply
      .header('content-type', 'text/html; charset=utf-8')
      .header('content-security-policy', CHAT_PAGE_CSP)
      .header('x-content-type-options', 'nosniff')
      .header('referrer-policy', 'no-referrer')
      .send(CHAT_PAGE),
  );
  app.get('/favicon.ico', async (_request, reply) => reply.code(204).send());
  chatRoutes(app, ctx);
  completionRoutes(app, ctx);
  embeddingRoutes(app, ctx);
  modelRoutes(app, ctx);
  receiptRoutes(app, ctx);
  statusRoutes(app, ctx, { draining: () => draining });

  async function drain(drainOptions: { timeoutMs?: number } = {}): Promise<void> {
    if (drainPromise) return drainPromise;
    draining = true;
    const timeoutMs = drainOptions.timeoutMs ?? defaultDrainTimeout;
    drainPromise = (async () => {
      const idle = () => new Promise<void>((resolve) => {
        if (inFlight === 0) return resolve();
        onIdle = resolve;
      });
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        idle().then(() => false),
        new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeoutMs))),
      ]);
      clearTimeout(timer);
      if (timedOut) {
        const reason = new ApiError(503, 'service_unavailable', 'The server shut down before this request finished.', { code: 'server_shutting_down' });
        for (const controller of controllers) controller.abort(reason);
        // Cancelled generations end within an engine step; do not wait on a stuck client forever.
        await Promise.race([idle(), new Promise((resolve) => setTimeout(resolve, 5000).unref())]);
      }
      onIdle = undefined;
      await app.close();
    })();
    return drainPromise;
  }

  const server = app as unknown as GenesisServer;
  Object.defineProperty(server, 'metrics', { value: metrics, enumerable: false });
  Object.defineProperty(server, 'draining', { get: () => draining, enumerable: false });
  Object.defineProperty(server, 'drain', { value: drain, enumerable: false });
  return server;
}
