// Module entry: llama.cpp backend set-up, logging, and the exported functions and classes.
#include <napi.h>

#include <cmath>
#include <mutex>

#include "addon/convert.h"
#include "addon/log.h"
#include "addon/model.h"
#include "addon/moe.h"
#include "addon/rpc.h"
#include "engine/bandwidth.h"
#include "ggml-backend.h"
#include "llama.h"

#if GENESIS_CUDA
// From cuda_profiler_api.h (cudaError_t is an int-sized enum; 0 is cudaSuccess), declared here so
// that the addon's sources need no CUDA headers.
extern "C" int cudaProfilerStart(void);
extern "C" int cudaProfilerStop(void);
#endif

namespace genesis {

// cudaProfiler(on): opens or closes the range a profiler started with `ncu --profile-from-start off`
// records (benchmarks/gpu-profile.mjs). True when done; false on the CPU build or a CUDA error.
static Napi::Value CudaProfiler(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) {
    Napi::TypeError::New(env, "cudaProfiler(on: boolean)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
#if GENESIS_CUDA
  const int status = info[0].As<Napi::Boolean>().Value() ? cudaProfilerStart() : cudaProfilerStop();
  return Napi::Boolean::New(env, status == 0);
#else
  return Napi::Boolean::New(env, false);
#endif
}

static Napi::Value SystemInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("llamaCpp", std::string(llama_print_system_info()));
  // A local GPU (llama_supports_gpu_offload also counts the RPC backend, which every build has).
  o.Set("gpuOffload", ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) != nullptr ||
                          ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU) != nullptr);
  o.Set("rpc", llama_supports_rpc());
  o.Set("maxDevices", static_cast<double>(llama_max_devices()));
  o.Set("mmap", llama_supports_mmap());
  o.Set("maxSequences", static_cast<double>(llama_max_parallel_sequences()));
  o.Set("variant", GENESIS_CUDA ? "cuda" : "cpu");
  return o;
}

namespace {

// An optional integer option: `fallback` when undefined or null, else an integer in [min, max].
double integer_option(Napi::Env env, const Napi::Object& o, const char* key, double fallback, double min, double max) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return fallback;
  const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
  if (!std::isfinite(d) || std::floor(d) != d || d < min || d > max) {
    invalid_option(env, key, "an integer in [" + std::to_string(static_cast<int64_t>(min)) + ", " + std::to_string(static_cast<int64_t>(max)) + "]");
  }
  return d;
}

// Every option is copied into a plain struct on the JS thread; Execute touches no JS value.
class BandwidthWorker : public Napi::AsyncWorker {
 public:
  BandwidthWorker(Napi::Env env, BandwidthOptions options)
      : Napi::AsyncWorker(env, "genesis.measureBandwidth"), deferred_(Napi::Promise::Deferred::New(env)), options_(options) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      result_ = measure_bandwidth(options_);
    } catch (const BandwidthError& e) {
      failure_ = e;
    } catch (const std::exception& e) {
      failure_ = BandwidthError("ENGINE", std::string("the bandwidth probe failed: ") + e.what());
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (!failure_.code.empty()) {
      Napi::Error error = CodedError(env, failure_.code, failure_.what());
      if (!failure_.option.empty()) {
        error.Set("option", Napi::String::New(env, failure_.option));
        error.Set("expected", Napi::String::New(env, failure_.expected));
      }
      deferred_.Reject(error.Value());
      return;
    }
    Napi::Object o = Napi::Object::New(env);
    o.Set("device", result_.device);
    o.Set("description", result_.description);
    o.Set("bytes", static_cast<double>(result_.bytes));
    o.Set("iterations", result_.iterations);
    o.Set("bestBytesPerSecond", result_.best_bytes_per_second);
    o.Set("meanBytesPerSecond", result_.mean_bytes_per_second);
    deferred_.Resolve(o);
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  BandwidthOptions options_;
  BandwidthResult result_;
  BandwidthError failure_{"", ""};
};

}  // namespace

// measureBandwidth({ device?, gpuIndex?, bytes?, iterations?, warmup?, threads? }): Promise<result>
static Napi::Value MeasureBandwidth(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() > 0 && !info[0].IsUndefined() && !info[0].IsObject()) invalid_option(env, "options", "an object");
  const Napi::Object o = info.Length() > 0 && info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
  BandwidthOptions options;
  const Napi::Value device = o.Get("device");
  const std::string name = device.IsString() ? device.As<Napi::String>().Utf8Value() : std::string();
  if (device.IsUndefined() || device.IsNull() || name == "cpu") {
    options.device = BandwidthDevice::Cpu;
  } else if (name == "gpu") {
    options.device = BandwidthDevice::Gpu;
  } else {
    invalid_option(env, "device", "'cpu' or 'gpu'");
  }
  const Napi::Value gpu_index = o.Get("gpuIndex");
  if (!gpu_index.IsUndefined() && !gpu_index.IsNull() && options.device != BandwidthDevice::Gpu) {
    invalid_option(env, "gpuIndex", "undefined unless device is 'gpu' (gpuIndex picks among GPU devices)");
  }
  options.gpu_index = static_cast<int32_t>(integer_option(env, o, "gpuIndex", 0, 0, 1023));
  options.bytes = static_cast<uint64_t>(integer_option(env, o, "bytes", 0, kBandwidthMinBytes, kBandwidthMaxBytes));
  options.iterations = static_cast<int32_t>(integer_option(env, o, "iterations", 10, 1, kBandwidthMaxIterations));
  options.warmup = static_cast<int32_t>(integer_option(env, o, "warmup", 2, 0, kBandwidthMaxIterations));
  options.threads = static_cast<int32_t>(integer_option(env, o, "threads", 0, 1, kBandwidthMaxThreads));
  auto* worker = new BandwidthWorker(env, options);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // Process-wide llama.cpp set-up, once, whichever thread (main or worker) loads the addon first.
  static std::once_flag once;
  std::call_once(once, [] {
    install_log_callback();
    llama_backend_init();
  });
  exports.Set("loadModel", Napi::Function::New(env, LoadModel, "loadModel"));
  exports.Set("estimateMemory", Napi::Function::New(env, EstimateMemory, "estimateMemory"));
  exports.Set("measureBandwidth", Napi::Function::New(env, MeasureBandwidth, "measureBandwidth"));
  exports.Set("startRpcServer", Napi::Function::New(env, StartRpcServer, "startRpcServer"));
  exports.Set("systemInfo", Napi::Function::New(env, SystemInfo, "systemInfo"));
  exports.Set("cudaProfiler", Napi::Function::New(env, CudaProfiler, "cudaProfiler"));
  exports.Set("moeRoute", Napi::Function::New(env, MoeRoute, "moeRoute"));
  exports.Set("NativeModel", NativeModel::Define(env));
  return exports;
}

}  // namespace genesis

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return genesis::Init(env, exports); }

NODE_API_MODULE(genesis, InitModule)
