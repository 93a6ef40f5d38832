// Memory-bandwidth probe: times a large F32 -> F32 ggml_cpy on one ggml backend device, the same
// kind of streaming read + write a decode step does over the weights. The benchmark harness
// divides the bytes of weights read per step by this figure (the roofline).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace genesis {

enum class BandwidthDevice { Cpu, Gpu };

// Limits shared with src/system.ts (which checks them first, to report the value it received).
constexpr uint64_t kBandwidthMinBytes = 1ull << 20;
// ggml's CPU copy counts elements in an int: 4 GiB of F32 (2^30 elements) stays well inside it.
constexpr uint64_t kBandwidthMaxBytes = 4ull << 30;
constexpr uint64_t kBandwidthDefaultCpuBytes = 256ull << 20;
// Long enough that one GPU copy takes a fraction of a millisecond, not a few microseconds.
constexpr uint64_t kBandwidthDefaultGpuBytes = 1ull << 30;
constexpr int32_t kBandwidthMaxIterations = 1000;
constexpr int32_t kBandwidthMaxThreads = 1024;

struct BandwidthOptions {
  BandwidthDevice device = BandwidthDevice::Cpu;
  int32_t gpu_index = 0;   // among GPU devices only
  uint64_t bytes = 0;      // per tensor; 0: the device's default above
  int32_t iterations = 10;
  int32_t warmup = 2;
  int32_t threads = 0;     // CPU device only; 0: hardware concurrency
};

struct BandwidthResult {
  std::string device;       // ggml device name, e.g. "CPU", "CUDA0"
  std::string description;  // e.g. the CPU model or the GPU name
  uint64_t bytes = 0;       // size of each of the two tensors
  int32_t iterations = 0;
  double best_bytes_per_second = 0;  // 2 * bytes over the fastest iteration
  double mean_bytes_per_second = 0;  // 2 * bytes * iterations over their total time
};

// A failure the caller can report as a typed error: code is "INVALID_OPTION" (option and expected
// say which and what) or "ENGINE".
struct BandwidthError : std::runtime_error {
  BandwidthError(std::string code, const std::string& message, std::string option = "", std::string expected = "")
      : std::runtime_error(message), code(std::move(code)), option(std::move(option)), expected(std::move(expected)) {}
  std::string code;
  std::string option;
  std::string expected;
};

// Blocks for the whole measurement (call it off the JS thread). Throws BandwidthError.
BandwidthResult measure_bandwidth(const BandwidthOptions& options);

}  // namespace genesis
