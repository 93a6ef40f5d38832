/**
 * The README's API example must work as written: it is run here with only the model path (and the
 * package name) substituted.
 */
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeFixtureModel } from './fixtures/models.js';

describe('README', () => {
  it('starts with the two set-up commands', async () => {
    const readme = await readFile(new URL('../README.md', import.meta.url), 'utf8');
    const block = /```sh\n([\s\S]*?)```/.exec(readme)?.[1]?.trim().split('\n');
    expect(block).toEqual(['npm install --foreground-scripts && npm start', 'npm test']);
    const ci = await readFile(new URL('../.ci/run', import.meta.url), 'utf8');
    expect(ci).toMatch(/^npm install --foreground-scripts/m);
    expect(ci).toMatch(/^npm test /m);
  });

  it('API example runs as written', async () => {
    const readme = await readFile(new URL('../README.md', import.meta.url), 'utf8');
    const example = /## API\n[\s\S]*?```ts\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(example).toBeDefined();
    const path = await makeFixtureModel({ arch: 'llama', type: 'q8_0' });
    const entry = new URL('../src/index.ts', import.meta.url).href;
    const code = example!.replace("from 'genesis-runtime'", `from '${entry}'`).replace("'model.gguf'", JSON.stringify(path));
    const dir = await mkdtemp(join(tmpdir(), 'genesis-readme-'));
    try {
      const file = join(dir, 'example.mts');
      await writeFile(file, `${code}\nconsole.log('\\nEXAMPLE-OK', r.finishReason, whole.usage.completionTokens);\n`);
      const r = spawnSync(process.execPath, ['--import', 'tsx', file], { encoding: 'utf8', timeout: 300_000 });
      expect(r.stderr).not.toMatch(/Error/);
      expect(r.status).toBe(0);
      expect(r.stdout).toMatch(/loading 100%/);
      expect(r.stdout).toMatch(/EXAMPLE-OK (eog|stop|length) (32|\d+)\n$/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
