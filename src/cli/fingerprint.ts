/**
 * genesis fingerprint make --model M --keys keys.json [--max-tokens N]     pairs (JSON) on stdout
 * genesis fingerprint check --model M --pairs pairs.json [--threshold T] [--out verdict.json] [--json]
 * The keys are secrets: nothing here prints them, only counts and the hash of the key set.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { loadModel, type Model } from '../model.js';
import { checkFingerprints, makeFingerprints, type FingerprintPair } from '../verify/fingerprint.js';
import { UsageError } from './usage-error.js';

export const FINGERPRINT_USAGE = `fingerprint (OML-style ownership check; raw prompt, greedy, token-exact):
  genesis fingerprint make --model <file.gguf> --keys <keys.json> [--max-tokens N]
                        writes [{ key, response, responseTokens }] for a JSON array of keys
  genesis fingerprint check --model <file.gguf> --pairs <pairs.json> [--threshold 0.9]
                        [--out verdict.json] [--json]: signed verdict; exit 0 passed, 1 not
`;

function readJson(flag: string, path: string | undefined): unknown {
  if (!path) throw new UsageError(`fingerprint needs --${flag} <file.json>`);
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    // The file holds secrets: say what is wrong with it, not what is in it.
    throw new UsageError(`--${flag} ${path}: cannot read it as JSON (${(error as NodeJS.ErrnoException).code ?? 'invalid JSON'})`);
  }
}

export async function fingerprintCommand(argv: string[]): Promise<number> {
  const [action, ...rest] = argv;
  const { values } = parseArgs({
    args: rest,
    options: {
      model: { type: 'string', short: 'm' },
      keys: { type: 'string' },
      pairs: { type: 'string' },
      'max-tokens': { type: 'string' },
      threshold: { type: 'string' },
      out: { type: 'string' },
      json: { type: 'boolean' },
      threads: { type: 'string', short: 't' },
      'gpu-layers': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || (action !== 'make' && action !== 'check')) {
    process.stdout.write(FINGERPRINT_USAGE);
    return values.help ? 0 : 2;
  }
  if (!values.model) throw new UsageError('fingerprint needs --model <file.gguf>');
  const number = (flag: string, v: string | undefined) => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new UsageError(`--${flag} expects a number, got ${JSON.stringify(v)}`);
    return n;
  };
  const input = action === 'make' ? readJson('keys', values.keys) : readJson('pairs', values.pairs);
  const gpuLayers = number('gpu-layers', values['gpu-layers']);
  const model: Model = await loadModel(values.model, {
    maxSequences: 1,
    ...(values.threads ? { threads: number('threads', values.threads) } : {}),
    ...(gpuLayers !== undefined ? { gpuLayers } : {}),
  });
  try {
    if (action === 'make') {
      if (!Array.isArray(input) || !input.every((k) => typeof k === 'string' && k.length > 0)) {
        throw new UsageError('--keys must hold a JSON array of non-empty strings');
      }
      const pairs = await makeFingerprints(model, input as string[], { maxTokens: number('max-tokens', values['max-tokens']) });
      process.stdout.write(`${JSON.stringify(pairs, null, 2)}\n`);
      process.stderr.write(`${pairs.length} pairs from ${values.model}\n`);
      return 0;
    }
    const verdict = await checkFingerprints(model, input as FingerprintPair[], { threshold: number('threshold', values.threshold) });
    if (values.out) writeFileSync(values.out, `${JSON.stringify(verdict.envelope, null, 2)}\n`);
    if (values.json) {
      process.stdout.write(`${JSON.stringify(verdict, null, 2)}\n`);
    } else {
      process.stdout.write(
        `${verdict.passed ? 'PASSED' : 'NOT PASSED'}: ${verdict.matched} of ${verdict.pairs} pairs match ` +
          `(${(verdict.rate * 100).toFixed(1)} %, threshold ${(verdict.threshold * 100).toFixed(1)} %)\n` +
          `key set sha256 ${verdict.keySetSha256}${values.out ? `; signed verdict in ${values.out}` : ''}\n`,
      );
    }
    return verdict.passed ? 0 : 1;
  } finally {
    await model.dispose();
  }
}
