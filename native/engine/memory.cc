#include "engine/memory.h"

#include <memory>
#include <stdexcept>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-rpc.h"
#include "llama-ext.h"
#include "llama-model.h"  // llama_model::dev_layer / dev_output: which device holds each layer

namespace genesis {

namespace {


// The local offload devices llama.cpp picks by default: the GPUs, or the integrated GPUs when
// there is no discrete one.
std::vector<ggml_backend_dev_t> local_gpus() {
  std::vector<ggml_backend_dev_t> gpus, igpus;
  for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    const auto type = ggml_backend_dev_type(dev);
    if (type == GGML_BACKEND_DEVICE_TYPE_GPU && !is_rpc_device(dev)) gpus.push_back(dev);
    if (type == GGML_BACKEND_DEVICE_TYPE_IGPU) igpus.push_back(dev);
  }
  return gpus.empty() ? igpus : gpus;
}


std::string device_kind(ggml_backend_dev_t dev) {
  if (is_rpc_device(dev)) return "rpc";
  switch (ggml_backend_dev_type(dev)) {
    case GGML_BACKEND_DEVICE_TYPE_CPU: return "cpu";
    case GGML_BACKEND_DEVICE_TYPE_GPU: return "gpu";
    case GGML_BACKEND_DEVICE_TYPE_IGPU: return "igpu";
    case GGML_BACKEND_DEVICE_TYPE_META: return "meta";
    default: return "accel";
  }
}

std::string list_devices(const std::vector<ggml_backend_dev_t>& devices) {
  std::string out;
  for (ggml_backend_dev_t dev : devices) {
    if (dev == nullptr) continue;
    out += (out.empty() ? "" : ", ") + std::string(ggml_backend_dev_name(dev)) + " (" + ggml_backend_dev_description(dev) + ")";
  }
  return out.empty() ? "none" : out;
}

}  // namespace

bool is_rpc_device(ggml_backend_dev_t dev) {
  ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);  // null for llama.cpp's meta (tensor-parallel) device
  return reg != nullptr && std::string(ggml_backend_reg_name(reg)) == "RPC";
}

std::string rpc_failure(const std::vector<std::string>& endpoints) {
  for (const std::string& endpoint : endpoints) {
    char why[512] = "";
    if (ggml_backend_rpc_endpoint_failed(endpoint.c_str(), why, sizeof why)) return endpoint + ": " + why;
  }
  return std::string();
}

ModelParams::ModelParams(const OffloadOptions& offload) : params_(llama_model_default_params()) {
  params_.n_gpu_layers = offload.gpu_layers;
  params_.load_mode = offload.use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
  if (offload.plain_host_weights) params_.use_extra_bufts = false;
  params_.split_mode = offload.split_mode;
  params_.main_gpu = offload.main_gpu;
  params_.load_mtp = offload.load_mtp;

  // The offload devices: each RPC server's devices first (as llama.cpp orders them, so that the
  // layers next to the output stay local), then the local GPUs. Given explicitly, so that RPC
  // devices join only this model, never the process-wide registry.
  std::vector<ggml_backend_dev_t> devices;
  for (const std::string& endpoint : offload.rpc_servers) {
    // Hold a connection for the whole load (the model's buffers take it over), and find out now
    // whether the server answers: its devices were registered once and are cached, reachable or not.
    ggml_backend_t probe = ggml_backend_rpc_init(endpoint.c_str(), 0);
    if (probe != nullptr) connections_.emplace_back(probe, ggml_backend_free);
    char why[512] = "";
    const bool failed = ggml_backend_rpc_endpoint_failed(endpoint.c_str(), why, sizeof why);
    if (probe == nullptr || failed) {
      throw RpcError("RPC_UNREACHABLE", "could not use the RPC server at " + endpoint + ": " +
                                            (why[0] != '\0' ? std::string(why) : std::string("it offers no device")) +
                                            " (is `genesis rpc-server` running there, reachable from here, and of the same version?)");
    }
    ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint.c_str());
    if (reg == nullptr) {
      throw RpcError("RPC_UNREACHABLE", "could not use the RPC server at " + endpoint +
                                            ": no connection, or it offers no device (is `genesis rpc-server` running there, reachable from here, and of the same version?)");
    }
    for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) devices.push_back(ggml_backend_reg_dev_get(reg, i));
  }
  for (ggml_backend_dev_t dev : local_gpus()) devices.push_back(dev);
  if (!offload.rpc_servers.empty()) {
    devices_ = devices;
    devices_.push_back(nullptr);
    params_.devices = devices_.data();
  } else if (offload.gpu_layers == 0) {
    // No layer offloaded means the CPU alone: with the GPUs listed, llama.cpp would still put the
    // KV cache and compute buffers on one and send large batches' matrix products there.
    devices_ = {nullptr};
    params_.devices = devices_.data();
  }
  if (offload.tensor_split.size() > devices.size()) {
    throw OptionError("tensorSplit", "at most one proportion per offload device (" + std::to_string(devices.size()) + ")",
                      "invalid option tensorSplit: " + std::to_string(offload.tensor_split.size()) + " proportions for " +
                          std::to_string(devices.size()) + " offload devices: " + list_devices(devices));
  }
  if (!offload.tensor_split.empty()) {
    tensor_split_.assign(llama_max_devices(), 0.0f);
    std::copy(offload.tensor_split.begin(), offload.tensor_split.end(), tensor_split_.begin());
    params_.tensor_split = tensor_split_.data();
  }
  if (offload.split_mode == LLAMA_SPLIT_MODE_ROW) {
    // Row split needs a backend with split buffers (CUDA); llama.cpp would fail deep in the load.
    for (ggml_backend_dev_t dev : devices) {
      ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
      if (reg == nullptr || ggml_backend_reg_get_proc_address(reg, "ggml_backend_split_buffer_type") == nullptr) {
        throw OptionError("splitMode", "'layer' or 'tensor' here: 'row' needs devices with split buffers (CUDA GPUs)",
                          "invalid option splitMode: 'row' needs devices with split buffers (CUDA GPUs); " + std::string(ggml_backend_dev_name(dev)) +
                              " (" + ggml_backend_dev_description(dev) + ") has none. Use 'layer' or 'tensor'");
      }
    }
  }
  if (offload.main_gpu != 0 && offload.main_gpu >= static_cast<int32_t>(devices.size())) {
    throw OptionError("mainGpu", "an index into the offload devices, below " + std::to_string(devices.size()),
                      "invalid option mainGpu: " + std::to_string(offload.main_gpu) + ", the offload devices are: " + list_devices(devices));
  }
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
  auto params = engine_context_params(engine);
  // As the engine sizes them: recurrent-state snapshots for drafts, and the MTP layers' own context
  // (a separate draft model's context is counted by the engine that owns it once loaded).
  const bool mtp = engine.mtp && engine.draft_max > 0 && !engine.deterministic;
  if (mtp && (llama_model_is_recurrent(model.get()) || llama_model_is_hybrid(model.get()))) params.n_rs_seq = engine.draft_max;
  std::unique_ptr<llama_context, decltype(&llama_free)> ctx(llama_init_from_model(model.get(), params), llama_free);
  if (!ctx) throw std::runtime_error("llama.cpp could not plan a context for " + path + " (contextSize x maxSequences too large?)");
  std::unique_ptr<llama_context, decltype(&llama_free)> draft(nullptr, llama_free);
  if (mtp && llama_model_n_layer_nextn(model.get()) > 0) {
    auto draft_params = params;
    draft_params.n_rs_seq = 0;
    draft_params.ctx_type = LLAMA_CONTEXT_TYPE_MTP;
    draft.reset(llama_init_from_model(model.get(), draft_params));
  }

  MemoryEstimate est;
  est.n_ctx = llama_n_ctx(ctx.get());
  est.n_layer = static_cast<uint32_t>(llama_model_n_layer(model.get()));
  est.n_expert = static_cast<uint32_t>(llama_model_n_expert(model.get()));
  est.n_params = llama_model_n_params(model.get());

  est.devices = device_placement(model.get(), ctx.get(), draft.get());
  return est;
}

std::vector<DeviceMemory> device_placement(const llama_model* model, const llama_context* ctx, const llama_context* draft) {
  DeviceMemory host;
  host.name = "CPU";
  host.kind = "cpu";
  host.host = true;
  if (ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)) {
    host.description = ggml_backend_dev_description(cpu);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(cpu, &free, &total);
    host.free = free;
    host.total = total;
  }
  const int32_t n_devices = llama_model_n_devices(model);
  std::vector<DeviceMemory> devices(static_cast<size_t>(n_devices));
  auto find = [&](ggml_backend_dev_t dev) -> DeviceMemory* {
    for (int32_t i = 0; i < n_devices; ++i) {
      if (dev == llama_model_get_device(model, i)) return &devices[static_cast<size_t>(i)];
    }
    return &host;
  };
  for (int32_t i = 0; i < n_devices; ++i) {
    ggml_backend_dev_t dev = llama_model_get_device(model, i);
    DeviceMemory& d = devices[static_cast<size_t>(i)];
    d.name = ggml_backend_dev_name(dev);
    d.description = ggml_backend_dev_description(dev);
    d.kind = device_kind(dev);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    d.free = free;
    d.total = total;
  }
  // Host buffer types (CPU, CPU_REPACK, pinned host buffers of a GPU backend) count as host memory.
  for (const auto& [buft, mb] : llama_get_memory_breakdown(ctx)) {
    DeviceMemory* into = ggml_backend_buft_is_host(buft) ? &host : find(ggml_backend_buft_get_device(buft));
    into->model += mb.model;
    into->context += mb.context;
    into->compute += mb.compute;
  }
  if (draft != nullptr) {
    // The draft's KV cache and compute buffers; its weights are the draft model's (or, for MTP
    // layers, this model's, already counted).
    for (const auto& [buft, mb] : llama_get_memory_breakdown(draft)) {
      DeviceMemory* into = ggml_backend_buft_is_host(buft) ? &host : find(ggml_backend_buft_get_device(buft));
      into->context += mb.context;
      into->compute += mb.compute;
    }
  }
  // Where each layer's weights live (a CPU layer's device is the CPU device: host).
  const int32_t n_layer = llama_model_n_layer(model);
  for (int32_t il = 0; il < n_layer; ++il) find(model->dev_layer(il))->layers.push_back(il);
  find(model->dev_output())->output = true;

  std::vector<DeviceMemory> out;
  out.push_back(host);
  for (auto& d : devices) out.push_back(d);
  return out;
}

}  // namespace genesis
