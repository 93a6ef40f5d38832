/** GET /v1/models and GET /v1/models/:model: the served models, then the fused ones. */
import type { FastifyInstance } from 'fastify';
import type { RouteContext } from '../context.js';

export function modelRoutes(app: FastifyInstance, ctx: RouteContext): void {
  app.get('/v1/models', async () => ({ object: 'list', data: [...ctx.models.list(), ...ctx.models.fused()].map((m) => ctx.models.describe(m)) }));
  app.get<{ Params: { model: string } }>('/v1/models/:model', async (request) => ctx.models.describe(ctx.models.lookup(request.params.model)));
}
