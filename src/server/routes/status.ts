/** GET /health (liveness + per-model engine state) and GET /metrics (Prometheus text). */
import type { FastifyInstance } from 'fastify';
import type { RouteContext } from '../context.js';

export function statusRoutes(app: FastifyInstance, ctx: RouteContext, state: { draining(): boolean }): void {
  app.get('/health', async (_request, reply) => {
    const draining = state.draining();
    const models = ctx.models.list().map((served) => {
      const model = served.current();
      if (!model) return { id: served.name, state: served.status().state };
      const s = model.stats();
      return { id: served.name, state: 'ready', active: s.active, queued: s.queued, kv_used_tokens: s.kvUsedTokens, kv_capacity_tokens: s.kvCapacityTokens };
    });
    // A model the runtime unloaded is healthy: the next request loads it.
    const ok = !draining && models.every((m) => m.state !== 'disposed');
    return reply.code(ok ? 200 : 503).send({ status: draining ? 'draining' : ok ? 'ok' : 'unavailable', models });
  });

  app.get('/metrics', async (_request, reply) => {
    const text = await ctx.metrics.registry.metrics();
    return reply.header('content-type', ctx.metrics.registry.contentType).send(text);
  });
}
