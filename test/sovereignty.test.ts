/**
 * Sovereignty, proven: loading a model, generating and embedding open no network socket and read no
 * file outside the model, the package itself, the system's libraries and kernel interfaces, and our
 * own configuration/cache directories. The run is traced with strace (every thread, every
 * open/openat/socket/connect) in a child process.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeFixtureModel, repoRoot } from './fixtures/models.js';

const strace = ['/usr/bin/strace', '/bin/strace'].find((p) => existsSync(p));
if (!strace) console.warn('sovereignty.test.ts: strace not found (apt-get install strace): skipped');

// In CI (.ci/run installs strace) a missing tracer is a failure, not a skip.
describe.skipIf(!strace && process.env['CI'] !== 'true')('sovereignty', { timeout: 180_000 }, () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'genesis-sovereignty-'));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it('load, generate and embed: no network socket, no file outside the allowed places', async () => {
    const model = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const script = join(dir, 'run.mts');
    await writeFile(
      script,
      `import { loadModel } from ${JSON.stringify(new URL('../src/index.ts', import.meta.url).href)};
const model = await loadModel(process.argv[2], { contextSize: 128, maxSequences: 2, threads: 1 });
const r = await model.complete('sovereign', { maxTokens: 8, temperature: 0 });
const e = await model.embed('local only');
await model.dispose();
console.log('RUN-OK', r.tokens.length, e.embeddings[0].length);
`,
    );
    const log = join(dir, 'trace.log');
    const config = join(dir, 'config');
    const cache = join(dir, 'cache');
    const r = spawnSync(
      strace!,
      ['-f', '-qq', '-e', 'trace=socket,connect,open,openat', '-o', log, process.execPath, '--import', 'tsx', script, model],
      { cwd: repoRoot(), encoding: 'utf8', env: { ...process.env, GENESIS_CONFIG_DIR: config, GENESIS_CACHE_DIR: cache } },
    );
    expect(r.stdout, r.stderr).toContain('RUN-OK 8 64');
    const lines = (await readFile(log, 'utf8')).split('\n');

    // Network: no internet-family socket at all. tsx talks to its own process over a Unix socket in the temp dir.
    const inet = lines.filter((l) => /socket\((AF_INET|AF_INET6|AF_PACKET|AF_NETLINK)/.test(l) || /sa_family=AF_INET/.test(l));
    expect(inet).toEqual([]);
    const unixConnects = lines.filter((l) => /connect\(/.test(l)).map((l) => /sun_path="([^"]+)"/.exec(l)?.[1] ?? l);
    for (const path of unixConnects) expect(path.startsWith(join(tmpdir(), 'tsx-')), path).toBe(true);

    // Files: every successfully opened path must be in an allowed place.
    const opened = lines
      .filter((l) => /open(at)?\(/.test(l) && !/= -1 /.test(l))
      .map((l) => /"([^"]+)"/.exec(l)?.[1])
      .filter((p): p is string => p !== undefined)
      .map((p) => resolve(repoRoot(), p));
    const allowed = [
      repoRoot(), // the package: sources, node_modules, the addon, and test fixtures (the model)
      dirname(resolve(model)),
      script, // this test's driver
      config,
      cache,
      join(tmpdir(), 'tsx-'), // tsx's compile cache
      dirname(process.execPath), // node itself
      '/proc/',
      '/sys/',
      '/dev/null',
      '/dev/urandom',
      '/lib/',
      '/lib64/',
      '/usr/lib/',
      '/usr/lib64/',
      '/etc/ld.so.cache',
      '/etc/ssl/', // node's OpenSSL configuration at start-up
      '/usr/share/zoneinfo/',
      '/etc/localtime',
    ];
    const outside = [...new Set(opened.filter((p) => !allowed.some((a) => p === a || p.startsWith(a))))];
    expect(outside).toEqual([]);
    // And the model itself was read.
    expect(opened).toContain(resolve(model));
  });
});
