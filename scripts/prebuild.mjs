// Prebuilt binaries for this platform: portable llama.cpp (no -march=native) linked into the addon,
// packed by prebuildify, then named by variant in prebuilds/<platform>-<arch>/:
//   genesis-runtime.napi.cpu.node    node scripts/prebuild.mjs  (GENESIS_CUDA=0 npm run prebuildify)
//   genesis-runtime.napi.cuda.node   GENESIS_CUDA=1 npm run prebuildify  (GENESIS_CUDA_ARCHS, e.g. "80;86;89;90")
// At run time src/binding.ts loads the CUDA one when a child process can load it and finds a GPU,
// else the CPU one, and says which and why (systemInfo().binary).
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, renameSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, relative } from 'node:path';
import { buildDir, buildVariant, cmakeBuildLlama, cudaLinkFlags, fetchLlama, repoRoot } from './llama.mjs';

process.env.GENESIS_NATIVE = '0';
const variant = buildVariant();
fetchLlama();
cmakeBuildLlama(variant);
const prebuildify = createRequire(import.meta.url).resolve('prebuildify/bin.js');
// node-gyp reads npm_config_* variables as gyp defines: the portable libraries and the variant.
const env = {
  ...process.env,
  npm_config_llama_build: relative(repoRoot, buildDir(variant)),
  npm_config_genesis_cuda: variant === 'cuda' ? '1' : '0',
  // Where cudart and cuBLAS are (outside the linker's default paths on CUDA machines), as build.mjs.
  ...(variant === 'cuda' ? { npm_config_cuda_lib_dirs: cudaLinkFlags(variant) } : {}),
};
const started = Date.now();
const r = spawnSync(process.execPath, [prebuildify, '--napi', '--strip'], { cwd: repoRoot, stdio: 'inherit', env });
if (r.status !== 0) process.exit(r.status ?? 1);
// prebuildify writes <name>.napi.node; name it by variant so both can sit side by side.
const dir = join(repoRoot, 'prebuilds', `${process.platform}-${process.arch}`);
const made = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.napi.node') && statSync(join(dir, f)).mtimeMs >= started - 1000) : [];
if (made.length !== 1) {
  process.stderr.write(`[genesis prebuild] expected one new *.napi.node in ${dir}, found ${made.join(', ') || 'none'}\n`);
  process.exit(1);
}
const target = join(dir, `genesis-runtime.napi.${variant}.node`);
renameSync(join(dir, made[0]), target);
process.stderr.write(`[genesis prebuild] ${relative(repoRoot, target)} (${variant})\n`);
