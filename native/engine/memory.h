// Memory planning: what a model and its engine context will take on each device, computed by
// llama.cpp itself with no_alloc (metadata only, allocations simulated, no weights read), and the
// model parameters that place weights (GPU layers; MoE expert tensors kept in host memory).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "ggml-backend.h"
#include "llama.h"

namespace genesis {

struct OffloadOptions {
  int32_t gpu_layers = 0;
  // Expert tensors (ffn_*_exps) of the first N layers stay in host memory even when their layer is
  // on a GPU: llama.cpp's --n-cpu-moe. The rest of those layers still runs on the GPU.
  uint32_t cpu_moe_layers = 0;
  bool use_mmap = true;
  // Weights in host memory in ggml's plain layout, never the CPU's repacked ones (llama.cpp's
  // --no-repack): expert placement (EngineOptions::gpu_experts) copies experts out of them, and
  // skips experts in ggml's own mul_mat_id only.
  bool plain_host_weights = false;
  // Several devices (llama.cpp's -sm/-ts/-mg): how layers (or rows, or tensors) are split over the
  // offload devices, in what proportions (empty: by free memory), and the main device.
  llama_split_mode split_mode = LLAMA_SPLIT_MODE_LAYER;
  std::vector<float> tensor_split;
  int32_t main_gpu = 0;
  // llama.cpp RPC servers ("host:port") whose devices join this model's split, ahead of local GPUs.
  std::vector<std::string> rpc_servers;
  // Also load the multi-token-prediction (nextn) layers, which llama.cpp skips by default.
  bool load_mtp = false;
};

// A load option this machine cannot satisfy (tensorSplit longer than the device list, ...).
struct OptionError : std::runtime_error {
  OptionError(std::string option, std::string expected, const std::string& message)
      : std::runtime_error(message), option(std::move(option)), expected(std::move(expected)) {}
  std::string option;
  std::string expected;
};

// An RPC server that cannot be reached (code RPC_UNREACHABLE) or was lost (RPC_DISCONNECTED).
struct RpcError : std::runtime_error {
  RpcError(std::string code, const std::string& message) : std::runtime_error(message), code(std::move(code)) {}
  std::string code;
};

// A device lent by an RPC server (llama.cpp's RPC backend).
bool is_rpc_device(ggml_backend_dev_t dev);

// The first of `endpoints` whose connection has failed, as "endpoint: reason"; empty when all are well.
std::string rpc_failure(const std::vector<std::string>& endpoints);

// llama_model_params for `offload`. Owns the tensor-override patterns the params point into, so it
// must outlive the llama_model_load_from_file call.
// Throws RpcError when an RPC server cannot be reached and OptionError when tensorSplit or mainGpu
// do not fit the devices.
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
  std::vector<ggml_backend_dev_t> devices_;  // null-terminated, when RPC servers are given
  // One backend per RPC server, holding its connection open while the model loads.
  std::vector<std::unique_ptr<ggml_backend, decltype(&ggml_backend_free)>> connections_;
  std::vector<float> tensor_split_;          // llama_max_devices() entries
};

struct DeviceMemory {
  std::string name;         // "CPU" for host memory, else ggml's device name ("CUDA0", "RPC0")
  std::string description;  // for RPC devices, the server's host:port
  std::string kind;         // "cpu" | "gpu" | "igpu" | "rpc" | "accel"
  bool host = false;
  std::vector<int32_t> layers;  // repeating layers whose weights this device holds (loaded models)
  bool output = false;          // holds the output layer
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

// What sits where in a loaded model with its context: host first, then the model's devices in
// split order, each with its bytes and layers.
// `draft`: the engine's draft context, whose KV cache and compute buffers count too (may be null).
std::vector<DeviceMemory> device_placement(const llama_model* model, const llama_context* ctx, const llama_context* draft = nullptr);

}  // namespace genesis
