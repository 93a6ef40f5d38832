#!/usr/bin/env bash
# The benchmark suite on the lent H100/H200 machine, which has CUDA, CMake and ninja but no Node.js
# and no network. Everything it needs travels in the ignored folder .device/:
#
#   here:   npm run build:ts && npm run device:pack          (node, headers, dist + modules, llama.cpp)
#   there:  device run, carry [".device"], one of
#             bash benchmarks/gpu.sh build                    CUDA build (sm_90, 16 jobs) + GPU checks
#             bash benchmarks/gpu.sh bench [bench options]    the suite (same warm machine: the build
#                                                             lives only while the machine stays warm)
#             bash benchmarks/gpu.sh determinism              200 requests alone vs together,
#                                                             default vs deterministic mode
#             bash benchmarks/gpu.sh all [bench options]      build, bench and determinism
#
# Results land in $OUT (the device tool brings them back): report.json, report.md, report.html,
# build.log and checks.log. Copy the table into benchmarks/RESULTS.md with device, date and commit.
# Default bench options: both real shapes at Q4_0 with every layer, all weights on the GPU.
#
# GPU_SH_REHEARSE=1 runs the same offline steps with the CPU build on a machine without a GPU (a
# copy of the tree, .device/ and no network: `unshare -n sh -c "ip link set lo up && ..."`), to check
# the packing before spending device time.
set -euo pipefail
cd "$(dirname "$0")/.."

PACK=.device
OUT=${OUT:-$PWD/benchmarks/out/gpu}
NODE_HOME=/tmp/genesis-node
mkdir -p "$OUT"

say() { printf '[gpu.sh] %s\n' "$*" >&2; }

setup() {
  for f in node.xz node-headers.tar.xz app.tar.xz llama.tar.xz; do
    [ -f "$PACK/$f" ] || { say "missing $PACK/$f: run 'npm run build:ts && npm run device:pack' here and carry .device"; exit 2; }
  done
  if [ ! -x "$NODE_HOME/bin/node" ]; then
    mkdir -p "$NODE_HOME/bin"
    xz -dc "$PACK/node.xz" > "$NODE_HOME/bin/node.part"
    chmod +x "$NODE_HOME/bin/node.part" && mv "$NODE_HOME/bin/node.part" "$NODE_HOME/bin/node"
    tar -xJf "$PACK/node-headers.tar.xz" -C "$NODE_HOME"
  fi
  export PATH="$NODE_HOME/bin:$PATH"
  # node-gyp finds the headers next to the binary (scripts/build.mjs), never downloads them.
  export npm_config_nodedir="$NODE_HOME"
  if [ ! -f dist/cli/main.js ] || [ ! -d node_modules/fastify ]; then tar -xJf "$PACK/app.tar.xz"; fi
  if [ ! -f deps/llama.cpp/.genesis-archive.json ] && [ ! -d deps/llama.cpp/.git ]; then
    mkdir -p deps/llama.cpp
    tar -xJf "$PACK/llama.tar.xz" -C deps/llama.cpp
  fi
}

REHEARSE="${GPU_SH_REHEARSE:-0}"

cuda_env() {
  if [ "$REHEARSE" = 1 ]; then
    export GENESIS_CUDA=0 GENESIS_JOBS="${GENESIS_JOBS:-$(nproc)}"
    return
  fi
  export GENESIS_CUDA=1 GENESIS_CUDA_ARCHS="${GENESIS_CUDA_ARCHS:-90}" GENESIS_JOBS="${GENESIS_JOBS:-16}"
  command -v nvcc > /dev/null || export PATH="/usr/local/cuda/bin:$PATH"
  local toolkit
  toolkit="$(dirname "$(dirname "$(command -v nvcc)")")"
  if ! ls "$toolkit"/lib64/libcublas.so "$toolkit"/targets/*/lib/libcublas.so > /dev/null 2>&1; then
    # cuBLAS from the Python nvidia-cublas package: give CMake and the linker unversioned names.
    local cublas
    cublas="$(python3 -c 'import nvidia.cublas as c, os; print(os.path.dirname(c.__file__))' 2> /dev/null || true)"
    [ -n "$cublas" ] || { say "no cuBLAS in $toolkit and no Python nvidia-cublas package"; exit 2; }
    say "cuBLAS from $cublas"
    mkdir -p /tmp/genesis-cublas/lib
    for lib in "$cublas"/lib/libcublas*.so.*; do
      ln -sf "$lib" "/tmp/genesis-cublas/lib/$(basename "$lib" | sed 's/\.so\..*$/.so/')"
    done
    export GENESIS_CUDA_LIB_DIRS=/tmp/genesis-cublas/lib
    export LD_LIBRARY_PATH="$cublas/lib:${LD_LIBRARY_PATH:-}"
    export GENESIS_CMAKE_ARGS="-DCMAKE_LIBRARY_PATH=/tmp/genesis-cublas/lib -DCMAKE_INCLUDE_PATH=$cublas/include -DCMAKE_CUDA_FLAGS=-I$cublas/include -DCMAKE_CXX_FLAGS=-I$cublas/include"
  fi
}

build() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
    nvcc --version 2> /dev/null | tail -2 || true
    cmake --version | head -1
    node --version
  } 2>&1 | tee "$OUT/checks.log"
  say "building llama.cpp (GENESIS_CUDA=$GENESIS_CUDA, $GENESIS_JOBS jobs) and the addon"
  node scripts/build.mjs --force 2>&1 | tee "$OUT/build.log" | grep -E '^\[genesis build\]|error|FAILED' || true
  test -f build/Release/genesis.node || { say "the build failed: see $OUT/build.log"; tail -40 "$OUT/build.log"; exit 1; }
  say "checks: CUDA variant, GPU offload, bandwidth, generation on the GPU matches the CPU"
  REHEARSE="$REHEARSE" node --input-type=module - << 'EOF' 2>&1 | tee -a "$OUT/checks.log"
import { estimateMemory, loadModel, measureBandwidth, systemInfo } from './dist/index.js';
import { ensureDefaultModel } from './dist/synthetic/default-model.js';
const gpu = process.env.REHEARSE !== '1';
const info = systemInfo();
console.log('systemInfo', JSON.stringify(info));
if (gpu && info.variant !== 'cuda') throw new Error('the addon is not the CUDA build');
const bw = await measureBandwidth(gpu ? { device: 'gpu', bytes: 1024 ** 3, iterations: 20 } : { device: 'cpu' });
console.log(`bandwidth ${bw.description}: ${(bw.bestBytesPerSecond / 1e12).toFixed(2)} TB/s best, ${(bw.meanBytesPerSecond / 1e12).toFixed(2)} mean`);
const path = await ensureDefaultModel();
const prompt = 'The quick brown fox';
const texts = [];
for (const gpuLayers of [0, 'max']) {
  const model = await loadModel(path, { gpuLayers, contextSize: 512, maxSequences: 4 });
  const r = await model.complete(prompt, { maxTokens: 32, temperature: 0, ignoreEos: true });
  texts.push(r.tokens.join(','));
  console.log(`gpuLayers ${gpuLayers}: ${r.timings.tokensPerSecond.toFixed(1)} t/s, tokens ${r.tokens.slice(0, 8).join(',')}...`);
  await model.dispose();
}
// Greedy tokens may part where two logits are within float rounding of each other; say so, do not hide it.
const same = texts[0] === texts[1];
console.log(same ? 'GPU and CPU greedy tokens identical' : 'GPU and CPU greedy tokens differ (check the logits: near-ties or a real error)');
// Device memory after 20 loads and disposals must be where it started (the CUDA issue, part 5).
const free = async () => (await estimateMemory(path, { gpuLayers: gpu ? 'max' : 0, contextSize: 512 })).devices.find((d) => !d.host)?.free ?? 0;
const before = await free();
for (let i = 0; i < 20; i++) {
  const model = await loadModel(path, { gpuLayers: gpu ? 'max' : 0, contextSize: 512, maxSequences: 4 });
  await model.complete(prompt, { maxTokens: 4, temperature: 0 });
  await model.dispose();
}
const after = await free();
console.log(`device memory free before 20 load/dispose cycles ${(before / 2 ** 20).toFixed(0)} MiB, after ${(after / 2 ** 20).toFixed(0)} MiB, difference ${((before - after) / 2 ** 20).toFixed(1)} MiB`);
if (gpu && before - after > 64 * 2 ** 20) throw new Error('device memory leaked across load/dispose cycles');
EOF
}

bench() {
  local args=("$@")
  [ ${#args[@]} -gt 0 ] || args=(--model qwen3-30b-a3b:q4_0 --model llama-3-8b:q4_0 --repeat 2)
  local layers=999
  [ "$REHEARSE" = 1 ] && layers=0
  say "genesis bench --gpu-layers $layers ${args[*]}"
  node dist/cli/main.js bench --gpu-layers "$layers" --out "$OUT" "${args[@]}" 2>&1 | tee "$OUT/bench.log"
}

determinism() {
  local layers=999
  [ "$REHEARSE" = 1 ] && layers=0
  node dist/cli/main.js bench --determinism "${DETERMINISM_REQUESTS:-200}" --model llama-3-8b:q4_0:8 --gpu-layers "$layers" 2>&1 | tee "$OUT/determinism.log"
}

cmd="${1:-all}"
shift || true
setup
cuda_env
case "$cmd" in
  build) build ;;
  bench) bench "$@" ;;
  determinism) determinism ;;
  all) build && bench "$@" && determinism ;;
  *) say "usage: bash benchmarks/gpu.sh build|bench|determinism|all [bench options]"; exit 2 ;;
esac
