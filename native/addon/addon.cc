// Module entry: llama.cpp backend set-up, logging, and the exported functions and classes.
#include <napi.h>

#include <mutex>

#include "addon/log.h"
#include "addon/model.h"
#include "llama.h"

namespace genesis {

static Napi::Value SystemInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("llamaCpp", std::string(llama_print_system_info()));
  o.Set("gpuOffload", llama_supports_gpu_offload());
  o.Set("mmap", llama_supports_mmap());
  o.Set("maxSequences", static_cast<double>(llama_max_parallel_sequences()));
  o.Set("variant", GENESIS_CUDA ? "cuda" : "cpu");
  return o;
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // Process-wide llama.cpp set-up, once, whichever thread (main or worker) loads the addon first.
  static std::once_flag once;
  std::call_once(once, [] {
    install_log_callback();
    llama_backend_init();
  });
  exports.Set("loadModel", Napi::Function::New(env, LoadModel, "loadModel"));
  exports.Set("systemInfo", Napi::Function::New(env, SystemInfo, "systemInfo"));
  exports.Set("NativeModel", NativeModel::Define(env));
  return exports;
}

}  // namespace genesis

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return genesis::Init(env, exports); }

NODE_API_MODULE(genesis, InitModule)
