// Prebuilt binary for this platform: portable llama.cpp (no -march=native) linked into the addon,
// packed by prebuildify into prebuilds/<platform>-<arch>/ where node-gyp-build finds it.
//   node scripts/prebuild.mjs            CPU variant
//   GENESIS_CUDA=1 node scripts/prebuild.mjs   CUDA variant (ggml-cuda), see the CUDA issue
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { relative } from 'node:path';
import { buildDir, buildVariant, cmakeBuildLlama, fetchLlama, repoRoot } from './llama.mjs';

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
};
const r = spawnSync(process.execPath, [prebuildify, '--napi', '--strip'], { cwd: repoRoot, stdio: 'inherit', env });
process.exit(r.status ?? 1);
