// The server side of llama.cpp's RPC backend, inside the addon: `genesis rpc-server` lends this
// machine's devices to models loaded elsewhere with `rpcServers`. It is upstream's server
// (ggml_backend_rpc_start_server), built from the same pinned source as everything else.
#include "addon/rpc.h"

#include <arpa/inet.h>

#include <string>
#include <thread>
#include <vector>

#include "addon/convert.h"
#include "addon/model.h"
#include "engine/memory.h"
#include "ggml-backend.h"
#include "ggml-rpc.h"

namespace genesis {

namespace {

std::string available_devices() {
  std::string out;
  for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    out += (out.empty() ? "" : ", ") + std::string(ggml_backend_dev_name(dev));
  }
  return out;
}

// Upstream rpc-server's default: every GPU, else the CPU.
std::vector<ggml_backend_dev_t> default_devices() {
  std::vector<ggml_backend_dev_t> gpus;
  ggml_backend_dev_t cpu = nullptr;
  for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    const auto type = ggml_backend_dev_type(dev);
    if (type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) gpus.push_back(dev);
    if (type == GGML_BACKEND_DEVICE_TYPE_CPU && cpu == nullptr) cpu = dev;
  }
  if (gpus.empty() && cpu != nullptr) gpus.push_back(cpu);
  return gpus;
}

}  // namespace

// startRpcServer({ host, port, threads, devices?, cacheDir? }) -> { endpoint, devices, stopped }
// `stopped` rejects when the server ends (it cannot bind its port); it never resolves otherwise:
// the server runs until the process exits.
Napi::Value StartRpcServer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) invalid_option(env, "options", "an object { host, port, threads, devices?, cacheDir? }");
  const Napi::Object o = info[0].As<Napi::Object>();
  const Napi::Value host_v = o.Get("host");
  const std::string host = host_v.IsString() ? host_v.As<Napi::String>().Utf8Value() : std::string();
  in_addr addr{};
  if (inet_pton(AF_INET, host.c_str(), &addr) != 1) invalid_option(env, "host", "an IPv4 address such as 127.0.0.1 (llama.cpp's RPC server binds IPv4 literals only)");
  const Napi::Value port_v = o.Get("port");
  const double port = port_v.IsNumber() ? port_v.As<Napi::Number>().DoubleValue() : -1;
  if (!(port >= 1 && port <= 65535) || static_cast<double>(static_cast<int>(port)) != port) invalid_option(env, "port", "an integer in [1, 65535]");
  const Napi::Value threads_v = o.Get("threads");
  const double threads = threads_v.IsNumber() ? threads_v.As<Napi::Number>().DoubleValue() : -1;
  if (!(threads >= 1 && threads <= 1024)) invalid_option(env, "threads", "an integer in [1, 1024]");

  std::vector<ggml_backend_dev_t> devices;
  const Napi::Value devices_v = o.Get("devices");
  if (devices_v.IsArray() && devices_v.As<Napi::Array>().Length() > 0) {
    Napi::Array a = devices_v.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
      const std::string name = a.Get(i).IsString() ? a.Get(i).As<Napi::String>().Utf8Value() : std::string();
      ggml_backend_dev_t dev = ggml_backend_dev_by_name(name.c_str());
      if (dev == nullptr || is_rpc_device(dev)) {
        invalid_option(env, "devices", "names of this machine's devices: " + available_devices());
      }
      devices.push_back(dev);
    }
  } else {
    devices = default_devices();
  }
  if (devices.empty()) throw CodedError(env, "ENGINE", "this machine has no device to serve");
  const Napi::Value cache_v = o.Get("cacheDir");
  const std::string cache_dir = cache_v.IsString() ? cache_v.As<Napi::String>().Utf8Value() : std::string();
  const std::string endpoint = host + ":" + std::to_string(static_cast<int>(port));

  auto deferred = std::make_shared<Napi::Promise::Deferred>(Napi::Promise::Deferred::New(env));
  // Keeps the event loop alive while the server runs; called once, when it ends.
  Napi::ThreadSafeFunction ended = Napi::ThreadSafeFunction::New(
      env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "genesis.rpcServer", 0, 1);
  std::thread([ended, deferred, endpoint, cache_dir, devices, threads]() mutable {
    std::vector<ggml_backend_dev_t> devs = devices;
    ggml_backend_rpc_start_server(endpoint.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(), static_cast<size_t>(threads), devs.size(), devs.data());
    ended.BlockingCall([deferred, endpoint](Napi::Env env, Napi::Function) {
      deferred->Reject(CodedError(env, "RPC_SERVER", "the RPC server on " + endpoint + " stopped: it could not listen there (address in use, or not this machine's?)").Value());
    });
    ended.Release();
  }).detach();

  Napi::Object out = Napi::Object::New(env);
  out.Set("endpoint", endpoint);
  Napi::Array list = Napi::Array::New(env, devices.size());
  for (size_t i = 0; i < devices.size(); ++i) {
    Napi::Object d = Napi::Object::New(env);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(devices[i], &free, &total);
    d.Set("name", ggml_backend_dev_name(devices[i]));
    d.Set("description", ggml_backend_dev_description(devices[i]));
    d.Set("free", static_cast<double>(free));
    d.Set("total", static_cast<double>(total));
    list.Set(static_cast<uint32_t>(i), d);
  }
  out.Set("devices", list);
  out.Set("stopped", deferred->Promise());
  return out;
}

}  // namespace genesis
