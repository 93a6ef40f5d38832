// Memory planning: what a model and its engine context will take on each device, computed by
// llama.cpp itself with no_alloc (metadata only, allocations simulated, no weights read), and the
// model parameters that place weights (GPU layers; MoE expert tensors kept in host memory).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "llama.h"

namespace genesis {

struct OffloadOptions {
  int32_t gpu_layers = 0;
  // Expert tensors (ffn_*_exps) of the first N layers stay in host memory even when their layer is
  // on a GPU: llama.cpp's --n-cpu-moe. The rest of those layers still runs on the GPU.
  uint32_t cpu_moe_layers = 0;
  bool use_mmap = true;
};

// llama_model_params for `offload`. Owns the tensor-override patterns the params point into, so it
// must outlive the llama_model_load_from_file call.
class ModelParams {
 public:
  explicit ModelParams(const OffloadOptions& offload);
  ModelParams(const ModelParams&) = delete;
  ModelParams& operator=(const ModelParams&) = delete;
  llama_model_params& get() { return params_; }

 private:
  llama_model_params params_;
  std::vector<std::string> patterns_;
  std::vector<llama_model_tensor_buft_override> overrides_;
};

struct DeviceMemory {
  std::string name;         // "CPU" for host memory, else ggml's device name ("CUDA0")
  std::string description;
  bool host = false;
  uint64_t model = 0;       // weights
  uint64_t context = 0;     // KV cache (and recurrent state)
  uint64_t compute = 0;     // compute buffers
  uint64_t free = 0;        // as the device reports it now
  uint64_t total = 0;
};

struct MemoryEstimate {
  std::vector<DeviceMemory> devices;  // host first
  uint32_t n_ctx = 0;                 // context cells of the whole engine context
  uint32_t n_layer = 0;
  uint32_t n_expert = 0;
  uint64_t n_params = 0;
};

// Throws std::runtime_error when llama.cpp cannot read the model or build the context.
MemoryEstimate estimate_memory(const std::string& path, const OffloadOptions& offload, const EngineOptions& engine);

}  // namespace genesis
