#!/usr/bin/env bash
# The benchmark suite on the lent H100/H200 machine, which has CUDA, CMake and ninja but no Node.js
# and no network. Everything it needs travels in the ignored folder .device/:
#
#   here:   npm run build:ts && npm run device:pack          (node, headers, dist + modules, llama.cpp)
#   there:  device run, carry [".device"], one of
#             bash benchmarks/gpu.sh build                    CUDA build (sm_90, 16 jobs), bandwidth
#             bash benchmarks/gpu.sh checks [logits|concurrent|memory|paged|routing|swap|placement]   GPU vs CPU, N at
#                                                             once against solo, memory across reloads,
#                                                             paged attention against the standard cache
#             bash benchmarks/gpu.sh profile [SPEC]           decode-step profile at B=1,8,64 (ncu)
#             bash benchmarks/gpu.sh tests                    the test suite on the GPU
#             bash benchmarks/gpu.sh moe [iterations]         MoE routing: upstream's chain vs fused
#             bash benchmarks/gpu.sh prebuild                 the CUDA prebuild, loaded back by the loader
#             bash benchmarks/gpu.sh bench [bench options]    the suite (same warm machine: the build
#                                                             lives only while the machine stays warm)
#             bash benchmarks/gpu.sh determinism              200 requests alone vs together,
#                                                             default vs deterministic mode
#             bash benchmarks/gpu.sh all [bench options]      build, bench and determinism
#
# Results land in $OUT (the device tool brings them back): report.json, report.md, report.html,
# build.log and checks.log. Copy the table into benchmarks/RESULTS.md with device, date and commit.
# The device tool brings back at most 8 files per call: point OUT at a folder of the machine
# (OUT=/tmp/res/N bash benchmarks/gpu.sh ...) and end the call with
# `tar -C /tmp/res -cJf "$DEVICE_OUT/N.tar.xz" N` (DEVICE_OUT: the tool's own $OUT, saved first).
#
# One 30-minute lease, as the first went (2026-11-22, H100). The machine is given back 30 s after a
# call, and its build with it, so each call follows the last at once:
#   1. build, checks logits, checks memory                                   7 min (build 4.5)
#   2. profile, checks concurrent                                            5 min
#   3. bench --model qwen3-30b-a3b:q4_0 --repeat 1 --concurrency 1,8,32,64   5 min
#   4. tests                                                                 1 min
#   5. bench --model llama-3-8b:q4_0 --repeat 1 --concurrency 1,8,32,64      3.5 min
#   6. determinism (DETERMINISM_REQUESTS=128)                                1 min
# The second lease (2026-11-22) went: build + moe + checks paged + checks memory (7 min);
# bench server at 64,128,256 (llama-server alone needed 101 s at 128 and the call ran out at 256:
# keep the server sweep to 64,128 per call); bench server 64 + experts + tests (2.5 min);
# bench server 128 (2.5 min); bench server 64 unpaged + experts --repeat 2 (1.5 min).
# The third (2026-11-22) went: build + moe + checks paged (5.5 min); bench experts --repeat 2 + tests
# (2.5); kv-pool test alone + bench deepseek-v3:q4_0:1 single,batched (6; the 6.5 GB slice is
# generated there in about 2 min); bench server at --batch-size 2048/4096/8192 and c=64/128/256, one
# or two per call (1-3 min each: with -b 2048 llama-server finishes c=256 in 93 s); shared-prefix
# paged and not (1 min each); test files one by one, 8 at a time (1 min). A fresh machine's start and
# a CPU rebuild (GPU_SH_REHEARSE=1 build) did not fit the last 6 minutes.
# The fourth (2026-11-22) went: build + moe + tests (6 min); build + moe + test files one by one, 8
# at a time (8.5); build + bench routing (killed in slice generation at 250 s) + shared-prefix paged
# (5.5); bench routing again (killed at 400 s, still generating: bench models now share expert bytes).
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
    cublas="$(node -e "import('./scripts/llama.mjs').then((m) => console.log(m.detectCuda().cublas?.python ?? ''))" 2> /dev/null || true)"
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
  say "the addon: variant and GPU memory bandwidth"
  REHEARSE="$REHEARSE" node --input-type=module - << 'EOF' 2>&1 | tee -a "$OUT/checks.log"
import { measureBandwidth, systemInfo } from './dist/index.js';
const gpu = process.env.REHEARSE !== '1';
const info = systemInfo();
console.log('systemInfo', JSON.stringify(info));
if (gpu && info.variant !== 'cuda') throw new Error('the addon is not the CUDA build');
const bw = await measureBandwidth(gpu ? { device: 'gpu', bytes: 1024 ** 3, iterations: 20 } : { device: 'cpu' });
console.log(`bandwidth ${bw.description}: ${(bw.bestBytesPerSecond / 1e12).toFixed(2)} TB/s best, ${(bw.meanBytesPerSecond / 1e12).toFixed(2)} mean`);
EOF
}

# GPU against CPU on the same fixtures (logits, greedy tokens), N concurrent generations against
# their solo runs, device memory across 20 load/dispose cycles: benchmarks/gpu-checks.mjs.
checks() {
  node benchmarks/gpu-checks.mjs "${1:-all}" 2>&1 | grep -v -E '^(llama_|load|print_info|init_tokenizer|graph_|sched_|ggml_|~llama|set_abort|srv|slot)' | tee -a "$OUT/checks.log" || true
}

# Where a decode step's time goes at batch 1, 8 and 64 (benchmarks/gpu-profile.mjs): engine timings
# without a profiler, then kernel times from Nsight Compute, one process per batch size.
profile() {
  local spec="${1:-qwen3-30b-a3b:q4_0}"
  node benchmarks/gpu-profile.mjs time "$spec" 2>&1 | grep '^\[profile\]' | tee -a "$OUT/profile.log" || true
  for b in $(echo "${PROFILE_BATCHES:-1,8,64}" | tr , ' '); do
    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$OUT/ncu-$b.csv" \
      node benchmarks/gpu-profile.mjs kernels "$b" "$spec" 2>&1 | grep -E '^\[profile\]|==ERROR==|Error' | tee -a "$OUT/profile.log" || true
  done
  node benchmarks/gpu-profile.mjs summarize "$OUT" | tee -a "$OUT/profile.log"
}

# MoE routing step: llama.cpp's op chain against the fused kernel (benchmarks/moe-route.mjs).
moe() {
  node benchmarks/moe-route.mjs "${1:-200}" 2>&1 | tee "$OUT/moe-route.log" || true
}

# The CUDA prebuild (prebuildify; portable CPU code, so llama.cpp builds again: about 4.5 min), then
# the loader choosing it in a fresh process, and the binary packed in 15 MiB parts for the device tool
# (join them here: cat cuda-prebuild.xz.part-* | xz -d > genesis-runtime.napi.cuda.node).
prebuild() {
  [ -d node_modules/prebuildify ] || tar -xJf "$PACK/tests.tar.xz"
  GENESIS_CUDA=1 node scripts/prebuild.mjs > "$OUT/prebuild.log" 2>&1 || { tail -30 "$OUT/prebuild.log"; return 1; }
  local file=prebuilds/linux-x64/genesis-runtime.napi.cuda.node
  ls -la "$file"
  rm -rf /tmp/genesis-prebuilt && mkdir -p /tmp/genesis-prebuilt && cp -r prebuilds /tmp/genesis-prebuilt/
  node --input-type=module -e "
    import { chooseBinary } from './dist/binding.js';
    import { createRequire } from 'node:module';
    const choice = chooseBinary('/tmp/genesis-prebuilt', {});
    console.log('loader:', JSON.stringify(choice));
    console.log('systemInfo:', JSON.stringify(createRequire(import.meta.url)(choice.file).systemInfo()));" 2>&1 | tee -a "$OUT/prebuild.log"
  xz -T0 -6 -c "$file" | split -b 15M - "$OUT/cuda-prebuild.xz.part-"
  ls -la "$OUT"
}

# The whole test suite with the CUDA addon (every model offloaded by default), N workers.
tests() {
  [ -d node_modules/vitest ] || tar -xJf "$PACK/tests.tar.xz"
  node scripts/test.mjs --poolOptions.forks.maxForks="${TEST_WORKERS:-8}" 2>&1 | tee "$OUT/tests.log" | grep -E '(✓|×|FAIL|passed|failed)' | grep -v '^ *✓' | tail -60 || true
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
  checks) checks "$@" ;;
  profile) profile "$@" ;;
  tests) tests ;;
  moe) moe "$@" ;;
  prebuild) prebuild ;;
  all) build && checks && bench "$@" && determinism ;;
  *) say "usage: bash benchmarks/gpu.sh build|checks|profile|tests|moe|prebuild|bench|determinism|all [options]"; exit 2 ;;
esac
