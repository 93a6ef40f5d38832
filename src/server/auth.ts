/**
 * Bearer API keys. Keys are compared as SHA-256 digests with crypto.timingSafeEqual: both sides have
 * the same fixed length whatever the client sent, so the comparison time says nothing about the key.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { isIP } from 'node:net';
import { ApiError } from './errors.js';

/** True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[(.*)\]$/, '$1');
  if (h === 'localhost' || h.endsWith('.localhost')) return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || h === '0:0:0:0:0:0:0:1' || /^::ffff:127\./.test(h);
  return false;
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

/** A checker for `Authorization: Bearer <key>`; accepts any of `keys`. */
export function bearerAuth(keys: readonly string[]): (authorization: string | undefined) => void {
  const expected = keys.map(digest);
  return (authorization) => {
    const match = /^Bearer\s+(.+)$/i.exec(authorization?.trim() ?? '');
    if (!match) {
      throw new ApiError(401, 'authentication_error', 'Missing API key: send the header Authorization: Bearer <key>.', {
        code: 'missing_api_key',
        headers: { 'www-authenticate': 'Bearer' },
      });
    }
    const given = digest(match[1]!.trim());
    let ok = false;
    // Check every key (no early exit) so the time does not depend on which one matched.
    for (const key of expected) ok = timingSafeEqual(given, key) || ok;
    if (!ok) {
      throw new ApiError(401, 'authentication_error', 'Incorrect API key provided.', {
        code: 'invalid_api_key',
        headers: { 'www-authenticate': 'Bearer error="invalid_token"' },
      });
    }
  };
}
