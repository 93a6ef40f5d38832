/**
 * Server-sent events as OpenAI sends them: `data: <json>\n\n` per chunk, `data: [DONE]\n\n` at the
 * end. The body is a Readable over an async generator, so Fastify pipes it with backpressure and
 * destroys it (running the generator's finally) if the client goes away.
 */
import { Readable } from 'node:stream';
import type { FastifyReply } from 'fastify';

export const SSE_DONE = 'data: [DONE]\n\n';

export function sseEvent(data: unknown): string {
  return `data: ${JSON.stringify(data)}\n\n`;
}

/** Sends `events` (already formatted SSE text) as a text/event-stream response. */
export function sendSse(reply: FastifyReply, events: AsyncIterable<string>): FastifyReply {
  reply.raw.setTimeout(0); // a long generation is not an idle socket
  return reply
    .code(200)
    .header('content-type', 'text/event-stream; charset=utf-8')
    .header('cache-control', 'no-cache, no-transform')
    .header('x-accel-buffering', 'no')
    .send(Readable.from(events, { objectMode: false }));
}
