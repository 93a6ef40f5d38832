#include "engine/bandwidth.h"

#include <algorithm>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml-cpu.h"
#include "ggml.h"

#ifndef GENESIS_CUDA
#define GENESIS_CUDA 0
#endif

namespace genesis {

namespace {

[[noreturn]] void invalid(const std::string& option, const std::string& expected) {
  throw BandwidthError("INVALID_OPTION", "invalid option " + option + ": expected " + expected, option, expected);
}

std::string mib(uint64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

void check(const BandwidthOptions& o) {
  if (o.bytes != 0 && (o.bytes < kBandwidthMinBytes || o.bytes > kBandwidthMaxBytes)) {
    invalid("bytes", "an integer in [" + std::to_string(kBandwidthMinBytes) + ", " + std::to_string(kBandwidthMaxBytes) + "] (1 MiB to 4 GiB)");
  }
  if (o.iterations < 1 || o.iterations > kBandwidthMaxIterations) invalid("iterations", "an integer in [1, 1000]");
  if (o.warmup < 0 || o.warmup > kBandwidthMaxIterations) invalid("warmup", "an integer in [0, 1000]");
  if (o.threads < 0 || o.threads > kBandwidthMaxThreads) invalid("threads", "an integer in [1, 1024]");
  if (o.gpu_index < 0) invalid("gpuIndex", "an integer >= 0");
}

std::string device_list() {
  std::string names;
  for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
    if (!names.empty()) names += ", ";
    names += ggml_backend_dev_name(ggml_backend_dev_get(i));
  }
  return names.empty() ? "none" : names;
}

ggml_backend_dev_t pick_device(const BandwidthOptions& o) {
  std::vector<ggml_backend_dev_t> gpus;
  ggml_backend_dev_t cpu = nullptr;
  for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    const auto type = ggml_backend_dev_type(dev);
    if (type == GGML_BACKEND_DEVICE_TYPE_CPU && cpu == nullptr) cpu = dev;
    if (type == GGML_BACKEND_DEVICE_TYPE_GPU) gpus.push_back(dev);
  }
  if (o.device == BandwidthDevice::Cpu) {
    if (cpu == nullptr) throw BandwidthError("ENGINE", "ggml has no CPU device (devices: " + device_list() + ")");
    return cpu;
  }
  if (gpus.empty()) {
    const std::string why = GENESIS_CUDA ? "ggml found no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)"
                                         : "this is the CPU build of the addon (rebuild with GENESIS_CUDA=1 for a GPU)";
    invalid("device", "'cpu': no GPU device is available; " + why + "; ggml devices: " + device_list());
  }
  if (static_cast<size_t>(o.gpu_index) >= gpus.size()) {
    invalid("gpuIndex", "an integer in [0, " + std::to_string(gpus.size() - 1) + "] (GPU devices: " + std::to_string(gpus.size()) + ")");
  }
  return gpus[static_cast<size_t>(o.gpu_index)];
}

// Probes share the memory bus they measure: two at once would each report about half.
std::mutex probe_mutex;

}  // namespace

BandwidthResult measure_bandwidth(const BandwidthOptions& options) {
  check(options);
  std::lock_guard<std::mutex> lock(probe_mutex);
  ggml_backend_dev_t dev = pick_device(options);
  const bool is_cpu = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
  const uint64_t requested = options.bytes != 0 ? options.bytes : (is_cpu ? kBandwidthDefaultCpuBytes : kBandwidthDefaultGpuBytes);
  const int64_t elements = static_cast<int64_t>(requested / sizeof(float));
  const uint64_t bytes = static_cast<uint64_t>(elements) * sizeof(float);

  BandwidthResult result;
  result.device = ggml_backend_dev_name(dev);
  result.description = ggml_backend_dev_description(dev);
  result.bytes = bytes;
  result.iterations = options.iterations;

  // Host memory is reported without the page cache and overcommitted anyway: check GPUs only,
  // where a failed allocation is certain and the free figure is exact.
  if (!is_cpu) {
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    if (free > 0 && 2 * bytes + (64ull << 20) > free) {
      invalid("bytes", "at most " + std::to_string((free - std::min<size_t>(free, 64ull << 20)) / 2) + " bytes per tensor on " + result.device +
                           " (two tensors must fit in the " + mib(free) + " free)");
    }
  }

  ggml_backend_ptr backend(ggml_backend_dev_init(dev, nullptr));
  if (!backend) throw BandwidthError("ENGINE", "ggml could not initialise device " + result.device + " (" + result.description + ")");
  if (ggml_backend_is_cpu(backend.get())) {
    const int32_t threads = options.threads > 0 ? options.threads : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
    ggml_backend_cpu_set_n_threads(backend.get(), threads);
  }

  // Metadata only (no_alloc): the tensor data lives in the backend buffer below.
  ggml_init_params params = {ggml_tensor_overhead() * 4 + ggml_graph_overhead(), nullptr, true};
  ggml_context_ptr ctx(ggml_init(params));
  if (!ctx) throw BandwidthError("ENGINE", "ggml_init failed");
  ggml_tensor* src = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_F32, elements);
  ggml_tensor* dst = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_F32, elements);
  // F32 -> F32 contiguous: a plain threaded memcpy on the CPU, cudaMemcpyAsync device-to-device on CUDA.
  ggml_tensor* copy = ggml_cpy(ctx.get(), src, dst);
  ggml_cgraph* graph = ggml_new_graph(ctx.get());
  ggml_build_forward_expand(graph, copy);

  if (!ggml_backend_supports_op(backend.get(), copy)) {
    throw BandwidthError("ENGINE", "device " + result.device + " does not support an F32 copy in ggml");
  }
  ggml_backend_buffer_ptr buffer(ggml_backend_alloc_ctx_tensors(ctx.get(), backend.get()));
  if (!buffer) throw BandwidthError("ENGINE", "could not allocate 2 x " + mib(bytes) + " on " + result.device + "; pass a smaller bytes option");
  // Touch every page before timing, so first-touch page faults are not measured as bandwidth.
  ggml_backend_buffer_clear(buffer.get(), 0x3f);

  auto compute = [&] {
    if (ggml_backend_graph_compute(backend.get(), graph) != GGML_STATUS_SUCCESS) {
      throw BandwidthError("ENGINE", "ggml could not run the copy on " + result.device);
    }
    ggml_backend_synchronize(backend.get());
  };

  using Clock = std::chrono::steady_clock;
  for (int32_t i = 0; i < options.warmup; ++i) compute();
  double best = 0, total = 0;
  for (int32_t i = 0; i < options.iterations; ++i) {
    const auto start = Clock::now();
    compute();
    // Clamped: a division by zero would report an infinite bandwidth.
    const double seconds = std::max(1e-9, std::chrono::duration<double>(Clock::now() - start).count());
    best = i == 0 ? seconds : std::min(best, seconds);
    total += seconds;
  }
  // Each copy reads every byte of src and writes every byte of dst.
  const double moved = 2.0 * static_cast<double>(bytes);
  result.best_bytes_per_second = moved / best;
  result.mean_bytes_per_second = moved * options.iterations / total;
  return result;
}

}  // namespace genesis
