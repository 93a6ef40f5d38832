// `npm run device:pack`: packs what the lent GPU machine needs into the ignored folder .device/,
// because that machine has no Node.js and no network (benchmarks/gpu.sh unpacks it there):
//   node.xz            this machine's node binary (xz -9)
//   node-headers.tar.xz  its include/node headers, so node-gyp needs no download
//   app.tar.xz         dist/ and the node_modules packages needed to build and run (no test tools)
//   llama.tar.xz       a `git archive` of the pinned llama.cpp commit, without docs, benches and
//                      the vocab files no benchmark model uses (the device has no registry either)
// Everything together must stay under the device tool's 64 MiB; the script prints the sizes.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { LLAMA_COMMIT, llamaDir, repoRoot } from './llama.mjs';

const out = join(repoRoot, '.device');
const log = (message) => process.stderr.write(`[device-pack] ${message}\n`);

function run(cmd, args, options = {}) {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'inherit', 'inherit'], ...options });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with status ${r.status}`);
}

/** node_modules directories of `names` and everything they depend on (npm's nested layout). */
function closure(names) {
  const found = new Set();
  const visit = (name, fromDir) => {
    // Node's lookup: the nearest node_modules up from the dependent package.
    for (let dir = fromDir; ; dir = dirname(dir)) {
      const candidate = join(dir, 'node_modules', name);
      if (existsSync(join(candidate, 'package.json'))) {
        if (found.has(candidate)) return;
        found.add(candidate);
        const pkg = JSON.parse(readFileSync(join(candidate, 'package.json'), 'utf8'));
        for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.optionalDependencies })) visit(dep, candidate);
        return;
      }
      if (dir === repoRoot || dir === dirname(dir)) {
        return; // an optional dependency for another platform
      }
    }
  };
  for (const name of names) visit(name, repoRoot);
  return [...found].map((dir) => relative(repoRoot, dir)).sort();
}

function size(file) {
  return statSync(file).size;
}

mkdirSync(out, { recursive: true });

const nodeXz = join(out, 'node.xz');
const nodeStamp = join(out, 'node.version');
if (!existsSync(nodeXz) || !existsSync(nodeStamp) || readFileSync(nodeStamp, 'utf8') !== process.version) {
  log(`compressing ${process.execPath} (${process.version}) with xz -9; about a minute`);
  execFileSync('sh', ['-c', `xz -T2 -9 -c "${process.execPath}" > "${nodeXz}"`]);
  writeFileSync(nodeStamp, process.version);
}
const prefix = dirname(dirname(process.execPath));
if (!existsSync(join(prefix, 'include', 'node', 'node_api.h'))) throw new Error(`no Node headers under ${prefix}/include/node`);
run('tar', ['-cJf', join(out, 'node-headers.tar.xz'), '-C', prefix, 'include/node']);

if (!existsSync(join(repoRoot, 'dist', 'cli', 'main.js'))) throw new Error('dist/ is missing: run `npm run build:ts` first');
const pkg = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8'));
const modules = closure([...Object.keys(pkg.dependencies), 'node-gyp']);
log(`app: dist/ and ${modules.length} packages`);
run('tar', ['-cJf', join(out, 'app.tar.xz'), '-C', repoRoot, 'dist', ...modules]);

// The test suite and the prebuild on the GPU (gpu.sh tests, gpu.sh prebuild): the test runner, type
// checker, test-only packages and prebuildify, beyond what app.tar.xz holds.
const inApp = new Set(modules);
const testModules = closure(['vitest', 'tsx', 'typescript', 'openai', 'playwright-core', '@types/node', 'prebuildify']).filter((m) => !inApp.has(m));
log(`tests: ${testModules.length} more packages`);
run('tar', ['-cJf', join(out, 'tests.tar.xz'), '-C', repoRoot, ...testModules, 'node_modules/.bin'], { env: { ...process.env, XZ_OPT: '-T2 -9' } });

const keepVocab = ['llama-spm', 'llama-bpe', 'qwen2', 'qwen35'];
const tmp = join(out, 'llama-src');
rmSync(tmp, { recursive: true, force: true });
mkdirSync(tmp, { recursive: true });
execFileSync('sh', ['-c', `git -C "${llamaDir}" archive ${LLAMA_COMMIT} | tar -x -C "${tmp}"`]);
for (const dir of ['docs', 'benches', 'media', 'gguf-py', '.github', 'tools/ui/src', 'tools/ui/static', 'tools/ui/tests', 'tests/snapshots']) {
  rmSync(join(tmp, dir), { recursive: true, force: true });
}
for (const file of execFileSync('ls', [join(tmp, 'models')], { encoding: 'utf8' }).split('\n')) {
  const m = /^ggml-vocab-(.+)\.gguf/.exec(file);
  if (file && (!m || !keepVocab.includes(m[1]))) rmSync(join(tmp, 'models', file), { recursive: true, force: true });
}
writeFileSync(join(tmp, '.genesis-archive.json'), JSON.stringify({ commit: LLAMA_COMMIT }));
run('tar', ['-cJf', join(out, 'llama.tar.xz'), '-C', tmp, '.'], { env: { ...process.env, XZ_OPT: '-T2 -6' } });
rmSync(tmp, { recursive: true, force: true });

const files = ['node.xz', 'node-headers.tar.xz', 'app.tar.xz', 'llama.tar.xz', 'tests.tar.xz'];
let total = 0;
for (const f of files) {
  total += size(join(out, f));
  log(`${f.padEnd(20)} ${(size(join(out, f)) / 2 ** 20).toFixed(1)} MiB`);
}
log(`total ${(total / 2 ** 20).toFixed(1)} MiB (the device tool carries at most 64 MiB with the working tree)`);
