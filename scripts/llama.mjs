// Gets the pinned llama.cpp source and builds it with CMake as static libraries.
//
// The source comes from the npm registry: node-llama-cpp@3.22.1 ships llama.cpp as a git bundle
// (llama/gitRelease.bundle). We take only that bundle, never the package's JavaScript. The tarball
// is cached outside the repository; the clone lives in the ignored deps/llama.cpp.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { homedir, cpus } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const LLAMA_PACKAGE = 'node-llama-cpp@3.22.1';
export const LLAMA_COMMIT = 'de3ff815ea7d559ee917f063901b8986f038abc6';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const llamaDir = join(repoRoot, 'deps', 'llama.cpp');
const patchesDir = join(repoRoot, 'native', 'patches');

/**
 * Reference tools built with the libraries at install: the tests compare against them. Heavier
 * ones (llama-batched-bench pulls in llama-common) are built on demand by ensureReferenceTool().
 */
export const REFERENCE_TOOLS = ['llama-simple'];

export function cacheDir() {
  return process.env.GENESIS_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'genesis-runtime');
}

function log(message) {
  process.stderr.write(`[genesis build] ${message}\n`);
}

function run(cmd, args, options = {}) {
  const result = spawnSync(cmd, args, { stdio: 'inherit', ...options });
  if (result.error) throw new Error(`could not run ${cmd}: ${result.error.message}`);
  if (result.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with status ${result.status}`);
}

function git(args, cwd) {
  return execFileSync('git', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

function patchFiles() {
  if (!existsSync(patchesDir)) return [];
  return readdirSync(patchesDir)
    .filter((name) => name.endsWith('.patch'))
    .sort()
    .map((name) => join(patchesDir, name));
}

function patchesDigest() {
  const hash = createHash('sha256');
  // Names, not paths: a copy of the checkout elsewhere (the device machine's) holds the same patches.
  for (const file of patchFiles()) hash.update(basename(file)).update(readFileSync(file));
  return hash.digest('hex');
}

const archiveFile = join(llamaDir, '.genesis-archive.json');

/** The commit deps/llama.cpp holds: its git HEAD, or the commit an archive of it records. */
function sourceCommit() {
  if (existsSync(archiveFile)) return JSON.parse(readFileSync(archiveFile, 'utf8')).commit;
  try {
    return git(['rev-parse', 'HEAD'], llamaDir);
  } catch {
    return undefined;
  }
}

/** Clone the bundle into deps/llama.cpp at the pinned commit and apply native/patches/*.patch. */
export function fetchLlama() {
  const stampFile = join(llamaDir, '.genesis-source.json');
  const wanted = { commit: LLAMA_COMMIT, patches: patchesDigest() };
  const stamp = existsSync(stampFile) ? JSON.parse(readFileSync(stampFile, 'utf8')) : undefined;
  const commit = sourceCommit();
  if (stamp?.commit === wanted.commit && stamp.patches === wanted.patches && commit === LLAMA_COMMIT) return;
  if (existsSync(archiveFile) && !stamp) {
    // A `git archive` of the pinned commit (scripts/device-pack.mjs, for machines with no registry).
    if (commit !== LLAMA_COMMIT) throw new Error(`deps/llama.cpp is an archive of ${commit}, expected the pinned commit ${LLAMA_COMMIT}`);
    // No repository of its own: keep git from finding an enclosing one (a copy of our checkout),
    // in which `git apply` would take the patch's paths from that root and skip them all silently.
    const env = { ...process.env, GIT_CEILING_DIRECTORIES: dirname(llamaDir) };
    for (const patch of patchFiles()) {
      log(`applying ${patch}`);
      run('git', ['apply', '--whitespace=nowarn', patch], { cwd: llamaDir, env });
    }
    writeFileSync(stampFile, JSON.stringify(wanted, null, 2));
    return;
  }

  const cache = cacheDir();
  mkdirSync(cache, { recursive: true });
  const tarball = join(cache, `${LLAMA_PACKAGE.replace('@', '-')}.tgz`);
  if (!existsSync(tarball)) {
    log(`fetching ${LLAMA_PACKAGE} from the npm registry (for its llama.cpp bundle) into ${cache}`);
    run('npm', ['pack', LLAMA_PACKAGE, '--pack-destination', cache, '--silent'], { stdio: ['ignore', 'ignore', 'inherit'] });
    if (!existsSync(tarball)) throw new Error(`npm pack did not produce ${tarball}`);
  }
  const bundleDir = join(cache, 'bundle');
  const bundle = join(bundleDir, 'package', 'llama', 'gitRelease.bundle');
  if (!existsSync(bundle)) {
    mkdirSync(bundleDir, { recursive: true });
    run('tar', ['-xzf', tarball, '-C', bundleDir, 'package/llama/gitRelease.bundle']);
  }

  log(`cloning llama.cpp ${LLAMA_COMMIT.slice(0, 12)} into deps/llama.cpp`);
  rmSync(llamaDir, { recursive: true, force: true });
  mkdirSync(dirname(llamaDir), { recursive: true });
  run('git', ['clone', '--quiet', '--no-checkout', bundle, llamaDir]);
  run('git', ['-c', 'advice.detachedHead=false', 'checkout', '--quiet', '--detach', LLAMA_COMMIT], { cwd: llamaDir });
  const head = git(['rev-parse', 'HEAD'], llamaDir);
  if (head !== LLAMA_COMMIT) {
    throw new Error(`deps/llama.cpp is at ${head}, expected the pinned commit ${LLAMA_COMMIT}`);
  }
  for (const patch of patchFiles()) {
    log(`applying ${patch}`);
    run('git', ['apply', '--whitespace=nowarn', patch], { cwd: llamaDir });
  }
  writeFileSync(stampFile, JSON.stringify(wanted, null, 2));
}

/**
 * The CUDA toolchain of this machine: nvcc and cuBLAS (the toolkit's, or the Python nvidia-cublas
 * package's, as on machines where CUDA comes from pip), or why there is none.
 */
let cudaFound;

export function detectCuda() {
  cudaFound ??= findCuda();
  return cudaFound;
}

function findCuda() {
  const candidates = [process.env.CUDA_HOME, process.env.CUDA_PATH, '/usr/local/cuda'].filter(Boolean).map((root) => join(root, 'bin', 'nvcc'));
  const onPath = spawnSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' }).stdout?.trim();
  const nvcc = [onPath, ...candidates].find((p) => p && existsSync(p));
  if (!nvcc) return { ok: false, why: 'no nvcc on PATH, in $CUDA_HOME or /usr/local/cuda' };
  const toolkit = dirname(dirname(realpathSync(nvcc)));
  const libDirs = [join(toolkit, 'lib64'), join(toolkit, 'lib'), ...globDirs(join(toolkit, 'targets'), 'lib')];
  const toolkitCublas = libDirs.find((dir) => existsSync(join(dir, 'libcublas.so')));
  if (toolkitCublas) return { ok: true, nvcc, toolkit, cublas: { libDir: toolkitCublas } };
  // CUDA 12 wheels put cuBLAS in nvidia/cublas/{lib,include}; CUDA 13 wheels in nvidia/cu13/.
  const finder = [
    'import glob, os, nvidia',
    'hits = [d for b in nvidia.__path__ for d in (os.path.join(b, "cublas"), os.path.join(b, "cu13")) if glob.glob(os.path.join(d, "lib", "libcublas.so*"))]',
    'print(hits[0] if hits else "")',
  ].join('\n');
  const py = spawnSync('python3', ['-c', finder], { encoding: 'utf8' });
  const pkg = py.status === 0 ? py.stdout.trim() : '';
  if (pkg && existsSync(join(pkg, 'lib'))) return { ok: true, nvcc, toolkit, cublas: { libDir: join(pkg, 'lib'), includeDir: join(pkg, 'include'), python: pkg } };
  return { ok: false, why: `nvcc at ${nvcc}, but no cuBLAS in ${toolkit} and no Python nvidia-cublas package` };
}

function globDirs(root, leaf) {
  if (!existsSync(root)) return [];
  return readdirSync(root).map((d) => join(root, d, leaf)).filter((d) => existsSync(d));
}

/**
 * cuda when GENESIS_CUDA=1; cpu when GENESIS_CUDA=0; otherwise cuda when nvcc and cuBLAS are
 * present (detectCuda), else cpu.
 */
export function buildVariant() {
  const flag = process.env.GENESIS_CUDA;
  if (flag === '1' || flag === 'true') return 'cuda';
  if (flag === '0' || flag === 'false') return 'cpu';
  return detectCuda().ok ? 'cuda' : 'cpu';
}

/**
 * What the CUDA build needs beyond the defaults: for cuBLAS from the Python package, unversioned
 * library names (symlinks in the build folder), its include folder, and an rpath so the addon
 * finds it at run time; for the toolkit's, its library folder.
 */
export function cudaBuildEnv(variant = buildVariant()) {
  if (variant !== 'cuda') return { cmakeArgs: [], libDirs: [], rpath: [] };
  const cuda = detectCuda();
  if (!cuda.ok) throw new Error(`GENESIS_CUDA=1 but ${cuda.why}`);
  if (!cuda.cublas.python) return { cmakeArgs: [], libDirs: [cuda.cublas.libDir], rpath: [] };
  const links = join(buildDir(variant), 'cublas-links');
  mkdirSync(links, { recursive: true });
  for (const name of readdirSync(cuda.cublas.libDir)) {
    const m = /^(libcublas(?:Lt)?\.so)\.\d/.exec(name);
    const link = m && join(links, m[1]);
    if (link && !existsSync(link)) symlinkSync(join(cuda.cublas.libDir, name), link);
  }
  const inc = cuda.cublas.includeDir;
  log(`cuBLAS from the Python package ${cuda.cublas.python}`);
  return {
    cmakeArgs: [`-DCMAKE_LIBRARY_PATH=${links}`, `-DCMAKE_INCLUDE_PATH=${inc}`, `-DCMAKE_CUDA_FLAGS=-I${inc}`, `-DCMAKE_CXX_FLAGS=-I${inc}`],
    libDirs: [links],
    rpath: [cuda.cublas.libDir],
  };
}

/** Portable code (no -march=native), for prebuilt binaries that must run on any x86-64 CPU. */
export function portable() {
  return process.env.GENESIS_NATIVE === '0';
}

export function buildDir(variant = buildVariant()) {
  return join(llamaDir, `build-${variant}${portable() ? '-portable' : ''}`);
}

/** Static libraries of a variant, in link order. */
export function staticLibs(variant = buildVariant()) {
  const dir = buildDir(variant);
  const libs = [join(dir, 'src', 'libllama.a'), join(dir, 'ggml', 'src', 'libggml.a')];
  if (variant === 'cuda') libs.push(join(dir, 'ggml', 'src', 'ggml-cuda', 'libggml-cuda.a'), join(dir, 'genesis-moe', 'libgenesis-moe-cuda.a'));
  libs.push(join(dir, 'ggml', 'src', 'ggml-rpc', 'libggml-rpc.a'));
  libs.push(join(dir, 'ggml', 'src', 'libggml-cpu.a'), join(dir, 'ggml', 'src', 'libggml-base.a'));
  return libs;
}

function jobs() {
  return String(Number(process.env.GENESIS_JOBS) || Math.max(1, cpus().length));
}

/** Runs CMake's configure step when there is no configuration or it differs from ours. */
function configureLlama(variant) {
  const dir = buildDir(variant);
  const defines = {
    CMAKE_BUILD_TYPE: 'Release',
    BUILD_SHARED_LIBS: 'OFF',
    CMAKE_POSITION_INDEPENDENT_CODE: 'ON',
    // Portable builds (prebuilds) set GENESIS_NATIVE=0; a source build tunes for this CPU.
    GGML_NATIVE: portable() ? 'OFF' : 'ON',
    LLAMA_BUILD_TESTS: 'OFF',
    // llama-server is a reference for the benchmark harness (built on demand, never at install).
    // Its web UI would come from npm or a Hugging Face download: neither, it is not needed here.
    LLAMA_BUILD_SERVER: 'ON',
    LLAMA_BUILD_UI: 'OFF',
    LLAMA_USE_PREBUILT_UI: 'OFF',
    LLAMA_BUILD_APP: 'OFF',
    LLAMA_BUILD_EXAMPLES: 'ON',
    LLAMA_BUILD_TOOLS: 'ON',
    LLAMA_OPENSSL: 'OFF',
    GGML_CUDA: variant === 'cuda' ? 'ON' : 'OFF',
    // llama.cpp's RPC backend: remote devices in a model's split (loadModel rpcServers) and the
    // server side of it (genesis rpc-server). native/patches/0001 makes a lost server an error.
    GGML_RPC: 'ON',
    // Its RDMA transport is switched on when libibverbs is found at configure time, but the addon
    // does not link libibverbs: on such a machine (the lent H100) the first RPC use ended the
    // process with "undefined symbol: ibv_get_device_list". TCP is what genesis rpc-server speaks.
    GGML_RPC_RDMA: 'OFF',
  };
  if (variant === 'cuda') defines.CMAKE_CUDA_ARCHITECTURES = process.env.GENESIS_CUDA_ARCHS ?? '90';
  const generator = spawnSync('ninja', ['--version'], { stdio: 'ignore' }).status === 0 ? 'Ninja' : 'Unix Makefiles';
  const cache = join(dir, 'CMakeCache.txt');
  // Configure when there is no cache, or when an older configuration differs from `defines`.
  const cached = existsSync(cache) ? readFileSync(cache, 'utf8') : undefined;
  const current = (k, v) => new RegExp(`^${k}:[A-Z]+=${v}$`, 'm').test(cached ?? '');
  // GENESIS_CMAKE_ARGS: extra configure arguments (e.g. where cuBLAS lives); given, always configure.
  const extra = [...cudaBuildEnv(variant).cmakeArgs, ...(process.env.GENESIS_CMAKE_ARGS ?? '').split(/\s+/).filter(Boolean)];
  if (extra.length > 0 || !Object.entries(defines).every(([k, v]) => current(k, v))) {
    log(`configuring llama.cpp (${variant}) with CMake, generator ${generator}`);
    run('cmake', ['-S', llamaDir, '-B', dir, '-G', generator, ...Object.entries(defines).map(([k, v]) => `-D${k}=${v}`), ...extra], {
      stdio: ['ignore', 'ignore', 'inherit'],
    });
  }
  return dir;
}

export function cmakeBuildLlama(variant = buildVariant()) {
  const dir = configureLlama(variant);
  log(`building llama.cpp static libraries (${variant}) with ${jobs()} jobs`);
  const targets = ['llama', 'ggml', ...REFERENCE_TOOLS];
  run('cmake', ['--build', dir, '--parallel', jobs(), '--target', ...targets]);
  if (variant === 'cuda') buildOwnCuda(dir);
  for (const lib of staticLibs(variant)) {
    if (!existsSync(lib)) throw new Error(`the llama.cpp build did not produce ${lib}`);
  }
  return dir;
}

/** -L (and -rpath) flags for the CUDA runtime and cuBLAS the CUDA variant links against. */
export function cudaLinkFlags(variant = buildVariant()) {
  const roots = [process.env.CUDA_HOME, process.env.CUDA_PATH, '/usr/local/cuda'].filter(Boolean);
  const dirs = roots.flatMap((root) => [join(root, 'lib64'), join(root, 'lib')]).filter((dir) => existsSync(dir));
  const found = cudaBuildEnv(variant);
  dirs.unshift(...found.libDirs);
  if (process.env.GENESIS_CUDA_LIB_DIRS) dirs.unshift(...process.env.GENESIS_CUDA_LIB_DIRS.split(':'));
  return [...dirs.map((dir) => `-L${dir}`), ...found.rpath.map((dir) => `-Wl,-rpath,${dir}`)].join(' ');
}

/** Our own CUDA sources (native/moe: the fused MoE routing kernel), for the same architectures. */
function buildOwnCuda(dir) {
  const out = join(dir, 'genesis-moe');
  const generator = spawnSync('ninja', ['--version'], { stdio: 'ignore' }).status === 0 ? 'Ninja' : 'Unix Makefiles';
  // Configured every time (seconds): the architectures may have changed since the last build.
  run('cmake', ['-S', join(repoRoot, 'native', 'moe'), '-B', out, '-G', generator, '-DCMAKE_BUILD_TYPE=Release', `-DCMAKE_CUDA_ARCHITECTURES=${process.env.GENESIS_CUDA_ARCHS ?? '90'}`], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  run('cmake', ['--build', out, '--parallel', jobs()]);
}

/** Path of a reference tool (llama-simple, ...) built from the same source. */
export function referenceTool(name, variant = buildVariant()) {
  return join(buildDir(variant), 'bin', name);
}

const checkedTools = new Set();

/**
 * Builds a llama.cpp tool target (same source, same flags as the libraries): when it is missing,
 * and once per process otherwise, so that a tool built before the libraries changed (a patch, a
 * configure option) is brought up to date; ninja's no-op check takes about a second.
 */
export function ensureReferenceTool(name, variant = buildVariant()) {
  const tool = referenceTool(name, variant);
  const key = `${variant}:${name}`;
  if (checkedTools.has(key) && existsSync(tool)) return tool;
  return withBuildLock(variant, () => {
    if (!existsSync(tool)) log(`building the reference tool ${name} (${variant}) from the pinned llama.cpp (once; a few minutes)`);
    run('cmake', ['--build', configureLlama(variant), '--parallel', jobs(), '--target', name], { stdio: ['ignore', 'ignore', 'inherit'] });
    checkedTools.add(key);
    return tool;
  });
}

/**
 * Runs `fn` holding a lock on the variant's build directory: two ninja runs in one build tree (two
 * test workers each wanting a tool) corrupt its logs and race on shared targets. The lock is a
 * directory (mkdir is atomic) holding the owner's pid; one whose owner is gone is taken over.
 */
function withBuildLock(variant, fn) {
  const lock = `${buildDir(variant)}.lock`;
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const deadline = Date.now() + 60 * 60 * 1000;
  let waiting = false;
  for (;;) {
    try {
      mkdirSync(lock);
      writeFileSync(join(lock, 'pid'), String(process.pid));
      break;
    } catch (error) {
      if (error.code !== 'EEXIST') throw error;
      const owner = Number(existsSync(join(lock, 'pid')) ? readFileSync(join(lock, 'pid'), 'utf8') : NaN);
      if (Number.isInteger(owner) && !alive(owner)) {
        rmSync(lock, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for the build lock ${lock} (held by pid ${owner})`);
      if (!waiting) log(`waiting for another build in ${buildDir(variant)} (pid ${owner}) to finish`);
      waiting = true;
      Atomics.wait(sleeper, 0, 0, 500);
    }
  }
  try {
    return fn();
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return error.code === 'EPERM';
  }
}
