// `npm install` entry point: pinned llama.cpp -> static libraries (CMake) -> addon (node-gyp).
//   GENESIS_CUDA=1|0    build the CUDA variant (ggml-cuda) or the CPU one; unset: CUDA when nvcc
//                       and cuBLAS (the toolkit's, or the Python nvidia-cublas package's) are found
//   GENESIS_CUDA_ARCHS  CUDA architectures (default 90: Hopper); GENESIS_CUDA_LIB_DIRS extra lib dirs
//   GENESIS_NATIVE=0    portable CPU code (for prebuilt binaries) instead of -march=native
//   GENESIS_JOBS=N      parallel build jobs (default: all cores)
//   GENESIS_CMAKE_ARGS  extra arguments for llama.cpp's CMake configure step
//   --force             rebuild the addon even when a prebuilt binary would do
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { buildDir, buildVariant, cmakeBuildLlama, cudaLinkFlags, detectCuda, fetchLlama, repoRoot } from './llama.mjs';

function log(message) {
  process.stderr.write(`[genesis build] ${message}\n`);
}

function hasPrebuild() {
  return existsSync(join(repoRoot, 'prebuilds', `${process.platform}-${process.arch}`));
}

/** node-gyp from our devDependencies, else the copy npm itself ships with. */
function nodeGypCommand() {
  const require = createRequire(import.meta.url);
  try {
    return require.resolve('node-gyp/bin/node-gyp.js');
  } catch {
    if (process.env.npm_config_node_gyp) return process.env.npm_config_node_gyp;
    throw new Error('node-gyp was not found: run `npm install` (it is a devDependency) or install it globally');
  }
}

/** Node's own headers next to the running binary, so node-gyp never downloads them. */
function nodeDirArgs() {
  if (process.env.npm_config_nodedir) return [`--nodedir=${process.env.npm_config_nodedir}`];
  const prefix = dirname(dirname(process.execPath));
  return existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? [`--nodedir=${prefix}`] : [];
}

function main() {
  const force = process.argv.includes('--force') || process.env.GENESIS_BUILD_FROM_SOURCE === '1';
  if (!force && hasPrebuild()) {
    log(`using the prebuilt binary in prebuilds/${process.platform}-${process.arch} (set GENESIS_BUILD_FROM_SOURCE=1 to compile)`);
    return;
  }
  const variant = buildVariant();
  const cuda = detectCuda();
  log(
    variant === 'cuda'
      ? `CUDA variant (${process.env.GENESIS_CUDA ? 'GENESIS_CUDA=1' : `found nvcc ${cuda.nvcc} and cuBLAS`}), architectures ${process.env.GENESIS_CUDA_ARCHS ?? '90'}`
      : `CPU variant (${process.env.GENESIS_CUDA ? `GENESIS_CUDA=${process.env.GENESIS_CUDA}` : cuda.ok ? 'GENESIS_CUDA unset' : cuda.why})`,
  );
  fetchLlama();
  cmakeBuildLlama(variant);
  log(`building the addon (${variant}) with node-gyp`);
  const args = [
    nodeGypCommand(),
    'rebuild',
    '--release',
    `--jobs=${process.env.GENESIS_JOBS ?? 'max'}`,
    ...nodeDirArgs(),
    `--llama_build=${relative(repoRoot, buildDir(variant))}`,
    `--genesis_cuda=${variant === 'cuda' ? 1 : 0}`,
    ...(variant === 'cuda' ? [`--cuda_lib_dirs=${cudaLinkFlags(variant)}`] : []),
  ];
  const result = spawnSync(process.execPath, args, { cwd: repoRoot, stdio: 'inherit' });
  if (result.status !== 0) throw new Error(`node-gyp exited with status ${result.status}`);
  log('done: build/Release/genesis.node');
}

try {
  main();
} catch (error) {
  log(`failed: ${error instanceof Error ? error.message : String(error)}`);
  process.exit(1);
}
