#include "engine/memory.h"

#include <memory>
#include <stdexcept>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama-ext.h"

namespace genesis {

ModelParams::ModelParams(const OffloadOptions& offload) : params_(llama_model_default_params()) {
  params_.n_gpu_layers = offload.gpu_layers;
  params_.load_mode = offload.use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
  if (offload.cpu_moe_layers > 0) {
    // llama.cpp's --n-cpu-moe: one pattern per layer, as common/arg.cpp writes them.
    patterns_.reserve(offload.cpu_moe_layers);
    for (uint32_t i = 0; i < offload.cpu_moe_layers; ++i) {
      patterns_.push_back("blk\\." + std::to_string(i) + "\\.ffn_(up|down|gate|gate_up)_(ch|)exps");
    }
    for (const std::string& p : patterns_) overrides_.push_back({p.c_str(), ggml_backend_cpu_buffer_type()});
    overrides_.push_back({nullptr, nullptr});
    params_.tensor_buft_overrides = overrides_.data();
  }
}

MemoryEstimate estimate_memory(const std::string& path, const OffloadOptions& offload, const EngineOptions& engine) {
  ModelParams mparams(offload);
  mparams.get().no_alloc = true;  // metadata and simulated allocations only
  mparams.get().load_mode = LLAMA_LOAD_MODE_NONE;
  std::unique_ptr<llama_model, decltype(&llama_model_free)> model(llama_model_load_from_file(path.c_str(), mparams.get()), llama_model_free);
  if (!model) throw std::runtime_error("llama.cpp could not read " + path);
  std::unique_ptr<llama_context, decltype(&llama_free)> ctx(llama_init_from_model(model.get(), engine_context_params(engine)), llama_free);
  if (!ctx) throw std::runtime_error("llama.cpp could not plan a context for " + path + " (contextSize x maxSequences too large?)");

  MemoryEstimate est;
  est.n_ctx = llama_n_ctx(ctx.get());
  est.n_layer = static_cast<uint32_t>(llama_model_n_layer(model.get()));
  est.n_expert = static_cast<uint32_t>(llama_model_n_expert(model.get()));
  est.n_params = llama_model_n_params(model.get());

  DeviceMemory host;
  host.name = "CPU";
  host.host = true;
  if (ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)) {
    host.description = ggml_backend_dev_description(cpu);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(cpu, &free, &total);
    host.free = free;
    host.total = total;
  }
  const int32_t n_devices = llama_model_n_devices(model.get());
  std::vector<DeviceMemory> devices(static_cast<size_t>(n_devices));
  for (int32_t i = 0; i < n_devices; ++i) {
    ggml_backend_dev_t dev = llama_model_get_device(model.get(), i);
    DeviceMemory& d = devices[static_cast<size_t>(i)];
    d.name = ggml_backend_dev_name(dev);
    d.description = ggml_backend_dev_description(dev);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    d.free = free;
    d.total = total;
  }
  // Host buffer types (CPU, CPU_REPACK, pinned host buffers of a GPU backend) count as host memory.
  for (const auto& [buft, mb] : llama_get_memory_breakdown(ctx.get())) {
    DeviceMemory* into = &host;
    if (!ggml_backend_buft_is_host(buft)) {
      ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
      for (int32_t i = 0; i < n_devices; ++i) {
        if (dev == llama_model_get_device(model.get(), i)) into = &devices[static_cast<size_t>(i)];
      }
    }
    into->model += mb.model;
    into->context += mb.context;
    into->compute += mb.compute;
  }
  est.devices.push_back(host);
  for (auto& d : devices) est.devices.push_back(d);
  return est;
}

}  // namespace genesis
