/**
 * The local receipt-signing key: Ed25519, created on first use at
 * `$GENESIS_CONFIG_DIR/receipt-key.pem` (default `~/.config/genesis-runtime/`), the directory
 * 0700 and the file 0600. Key id: hex SHA-256 of the raw 32-byte public key.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { chmodSync, mkdirSync, openSync, readFileSync, writeSync, closeSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

export interface ReceiptKey {
  privateKey: KeyObject;
  publicKey: KeyObject;
  /** Hex SHA-256 of the raw public key. */
  keyId: string;
  /** SPKI PEM of the public key, to hand to verifiers. */
  publicKeyPem: string;
  path: string;
}

export function configDir(): string {
  return process.env['GENESIS_CONFIG_DIR'] ?? join(process.env['XDG_CONFIG_HOME'] ?? join(homedir(), '.config'), 'genesis-runtime');
}

export function receiptKeyPath(): string {
  return join(configDir(), 'receipt-key.pem');
}

/** Raw 32-byte Ed25519 public key (the last 32 bytes of its SPKI DER). */
export function rawPublicKey(publicKey: KeyObject): Buffer {
  const der = publicKey.export({ type: 'spki', format: 'der' });
  return der.subarray(der.length - 32);
}

export function keyIdOf(publicKey: KeyObject): string {
  return createHash('sha256').update(rawPublicKey(publicKey)).digest('hex');
}

/** A public key from SPKI PEM, a private-key PEM (its public half), or a KeyObject. */
export function toPublicKey(key: string | Buffer | KeyObject): KeyObject {
  if (typeof key !== 'string' && !Buffer.isBuffer(key)) return key.type === 'private' ? createPublicKey(key) : key;
  const text = key.toString();
  if (text.includes('PRIVATE KEY')) return createPublicKey(createPrivateKey(text));
  return createPublicKey(text);
}

const cache = new Map<string, ReceiptKey>();

/** Loads the signing key at `path` (default receiptKeyPath()), creating it with owner-only permissions if absent. */
export function loadOrCreateReceiptKey(path = receiptKeyPath()): ReceiptKey {
  const hit = cache.get(path);
  if (hit) return hit;
  let pem: string;
  try {
    pem = readFileSync(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    const dir = join(path, '..');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    chmodSync(dir, 0o700);
    const { privateKey } = generateKeyPairSync('ed25519');
    pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    try {
      // 'wx': never overwrite a key another process created meanwhile.
      const fd = openSync(path, 'wx', 0o600);
      try {
        writeSync(fd, pem);
      } finally {
        closeSync(fd);
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      pem = readFileSync(path, 'utf8');
    }
    chmodSync(path, 0o600);
  }
  const privateKey = createPrivateKey(pem);
  if (privateKey.asymmetricKeyType !== 'ed25519') throw new Error(`${path} is not an Ed25519 private key`);
  const publicKey = createPublicKey(privateKey);
  const key: ReceiptKey = {
    privateKey,
    publicKey,
    keyId: keyIdOf(publicKey),
    publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
    path,
  };
  cache.set(path, key);
  return key;
}
