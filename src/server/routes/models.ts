/** GET /v1/models and GET /v1/models/:model. */
import type { FastifyInstance } from 'fastify';
import type { RouteContext } from '../context.js';

export function modelRoutes(app: FastifyInstance, ctx: RouteContext): void {
  app.get('/v1/models', async () => ({ object: 'list', data: ctx.models.list().map((m) => ctx.models.describe(m)) }));
  app.get<{ Params: { model: string } }>('/v1/models/:model', async (request) => ctx.models.describe(ctx.models.get(request.params.model)));
}
