// `npm test`: type-check, run the vitest suites, end with a plain "N passed, N failed" line.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from './llama.mjs';

const bin = (name) => join(repoRoot, 'node_modules', '.bin', name);
const report = join(repoRoot, 'test-results', 'vitest.json');

function run(cmd, args) {
  const result = spawnSync(cmd, args, { cwd: repoRoot, stdio: 'inherit' });
  return result.status ?? 1;
}

let status = run(bin('tsc'), ['-p', 'tsconfig.json', '--noEmit']);
const typecheckFailed = status !== 0;
if (typecheckFailed) console.error('type check failed');

mkdirSync(join(repoRoot, 'test-results'), { recursive: true });
rmSync(report, { force: true });
const vitest = run(bin('vitest'), [
  'run',
  '--config',
  'test/vitest.config.ts',
  '--reporter=default',
  '--reporter=json',
  `--outputFile.json=${report}`,
  ...process.argv.slice(2),
]);
status ||= vitest;

let passed = 0;
let failed = 0;
if (existsSync(report)) {
  const json = JSON.parse(readFileSync(report, 'utf8'));
  passed = json.numPassedTests ?? 0;
  failed = (json.numFailedTests ?? 0) + (json.numRuntimeErrorTests ?? 0);
  // A suite that failed outside its tests (a hook, an import, a crash) counts as a failure too,
  // even when its tests were reported as skipped rather than failed.
  for (const file of json.testResults ?? []) {
    const failedTests = (file.assertionResults ?? []).filter((t) => t.status === 'failed').length;
    if (file.status === 'failed' && failedTests === 0) failed++;
  }
} else {
  failed = 1;
}
// The type check counts as one test: a suite green at run time but wrong in its types is not green.
if (typecheckFailed) failed++;
if (failed > 0 && status === 0) status = 1;
console.log(`${passed} passed, ${failed} failed`);
process.exit(status);
