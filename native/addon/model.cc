#include "addon/model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <thread>

#include "addon/convert.h"
#include "addon/log.h"
#include "engine/memory.h"

namespace genesis {

Napi::Error CodedError(Napi::Env env, const std::string& code, const std::string& message, const std::string& path) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  if (!path.empty()) error.Set("path", Napi::String::New(env, path));
  return error;
}

std::vector<llama_token> tokenize_text(const llama_vocab* vocab, const std::string& text, bool add_special, bool parse_special) {
  if (text.size() > static_cast<size_t>(INT32_MAX / 2)) throw std::runtime_error("text too long to tokenize");
  std::vector<llama_token> tokens(text.size() + 8);
  int32_t n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(), static_cast<int32_t>(tokens.size()), add_special, parse_special);
  if (n < 0 && n != INT32_MIN) {
    tokens.resize(static_cast<size_t>(-n));
    n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(), static_cast<int32_t>(tokens.size()), add_special, parse_special);
  }
  if (n < 0) throw std::runtime_error("llama.cpp could not tokenize the text");
  tokens.resize(static_cast<size_t>(n));
  return tokens;
}

// ---------------------------------------------------------------------------------------------
// Host

Host::~Host() { shutdown(); }

void Host::wait_jobs() {
  std::unique_lock<std::mutex> lock(jobs_mu);
  jobs_idle.wait(lock, [&] { return jobs_in_flight == 0; });
}

void Host::lend() {
  std::lock_guard<std::mutex> lock(lend_mu);
  lent++;
}

void Host::give_back() {
  llama_model* free_now = nullptr;
  {
    std::lock_guard<std::mutex> lock(lend_mu);
    if (--lent == 0) std::swap(free_now, orphaned);
  }
  if (free_now != nullptr) llama_model_free(free_now);
}

bool Host::is_lent() {
  std::lock_guard<std::mutex> lock(lend_mu);
  return lent > 0;
}

void Host::shutdown() {
  wait_jobs();
  embedder.reset();
  if (engine) {
    engine->stop();
    engine->join();
    engine.reset();
  }
  if (draft) {
    draft->give_back();  // this engine, the only user of the draft's model here, is gone
    draft.reset();
  }
  if (model != nullptr) {
    std::lock_guard<std::mutex> lock(lend_mu);
    if (lent > 0) {
      orphaned = model;  // another engine still drafts with it
    } else {
      llama_model_free(model);
    }
    model = nullptr;
  }
  if (events) {
    events.Release();
    events = Napi::ThreadSafeFunction();
  }
  closed = true;
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

// llama.cpp's log of a failure, cut to its last lines (it states the cause last), on one line.
std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  // Keep the last few lines: llama.cpp states the cause last.
  size_t pos = s.size();
  for (int lines = 0; lines < 4 && pos != std::string::npos && pos > 0; ++lines) pos = s.rfind('\n', pos - 1);
  if (pos != std::string::npos && pos > 0) s = s.substr(pos + 1);
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

// Why two models' tokenizers differ (size, type, or the first token whose text differs), or empty.
std::string vocab_mismatch(const llama_model* a, const llama_model* b) {
  const llama_vocab* va = llama_model_get_vocab(a);
  const llama_vocab* vb = llama_model_get_vocab(b);
  const int32_t n = llama_vocab_n_tokens(va);
  if (n != llama_vocab_n_tokens(vb)) return std::to_string(n) + " tokens against " + std::to_string(llama_vocab_n_tokens(vb));
  if (llama_vocab_type(va) != llama_vocab_type(vb)) return "another tokenizer type";
  for (llama_token t = 0; t < n; ++t) {
    if (std::strcmp(llama_vocab_get_text(va, t), llama_vocab_get_text(vb, t)) != 0) return "token " + std::to_string(t) + " differs";
  }
  return std::string();
}

struct LoadBaton {
  std::string path;
  OffloadOptions offload;
  EngineOptions engine;
  std::shared_ptr<Host> draft;  // speculative decoding: the draft model's host
};

// Progress calls queued on the TSFN may run after the load promise settles; they are dropped then,
// and OnOK reports 1.0 itself, so a listener sees increasing values ending at 1 before the promise resolves.
struct ProgressState {
  bool settled = false;  // JS thread only
  float delivered = -1.0f;
};

class LoadWorker : public Napi::AsyncWorker {
 public:
  LoadWorker(Napi::Env env, LoadBaton baton, Napi::Function on_progress, Napi::Function on_events)
      : Napi::AsyncWorker(env, "genesis.loadModel"), deferred_(Napi::Promise::Deferred::New(env)), baton_(std::move(baton)) {
    host_ = std::make_shared<Host>();
    host_->threads = baton_.engine.threads;
    if (!on_progress.IsEmpty()) {
      progress_ = Napi::ThreadSafeFunction::New(env, on_progress, "genesis.loadProgress", 0, 1);
      on_progress_ = Napi::Persistent(on_progress);
    }
    host_->events = Napi::ThreadSafeFunction::New(env, on_events, "genesis.engineEvents", 0, 1);
    // Only requests in flight keep the event loop alive, not an idle model.
    host_->events.Unref(env);
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    LogCapture capture;
    host_->offload = baton_.offload;
    std::unique_ptr<ModelParams> model_params;
    try {
      model_params = std::make_unique<ModelParams>(baton_.offload);
    } catch (const OptionError& e) {
      code_ = "INVALID_OPTION";
      option_ = e.option;
      expected_ = e.expected;
      message_ = e.what();
      return;
    } catch (const RpcError& e) {
      code_ = e.code;
      message_ = e.what();
      return;
    }
    llama_model_params& params = model_params->get();
    if (progress_) {
      params.progress_callback = [](float progress, void* data) {
        auto* self = static_cast<LoadWorker*>(data);
        // At most ~100 calls: a JS callback per tensor would only slow the load down.
        const int percent = static_cast<int>(progress * 100.0f);
        if (percent > self->last_percent_) {
          self->last_percent_ = percent;
          self->progress_.NonBlockingCall([progress, state = self->progress_state_](Napi::Env env, Napi::Function fn) {
            if (state->settled || progress <= state->delivered) return;
            state->delivered = progress;
            fn.Call({Napi::Number::New(env, progress)});
          });
        }
        return true;
      };
      params.progress_callback_user_data = this;
    }
    host_->model = llama_model_load_from_file(baton_.path.c_str(), params);
    const std::string lost = rpc_failure(baton_.offload.rpc_servers);
    if (!lost.empty()) {
      // The weights sent to it are gone (llama.cpp may not have noticed: a lost connection reads as zeros).
      code_ = "RPC_DISCONNECTED";
      message_ = "the RPC server " + lost + " while loading " + baton_.path;
      return;
    }
    if (host_->model == nullptr) {
      const std::string reason = capture.text();
      code_ = reason.find("unknown model architecture") != std::string::npos ? "MODEL_UNSUPPORTED_ARCH" : "MODEL_LOAD_FAILED";
      message_ = "llama.cpp could not load " + baton_.path + (reason.empty() ? std::string() : ": " + trim(reason));
      return;
    }
    try {
      Napi::ThreadSafeFunction events = host_->events;
      std::weak_ptr<Host> weak = host_;
      EngineOptions engine = baton_.engine;
      engine.rpc_endpoints = baton_.offload.rpc_servers;
      if (engine.mtp && llama_model_n_layer_nextn(host_->model) <= 0) {
        code_ = "INVALID_OPTION";
        option_ = "draft.mtp";
        expected_ = "a model with multi-token-prediction layers (GGUF key <arch>.nextn_predict_layers > 0)";
        message_ = "invalid option draft.mtp: " + baton_.path + " has no multi-token-prediction (nextn) layers to draft with";
        return;
      }
      if (baton_.draft) {
        const std::string mismatch = vocab_mismatch(host_->model, baton_.draft->model);
        if (!mismatch.empty()) {
          code_ = "INVALID_OPTION";
          option_ = "draft";
          expected_ = "a model with the same tokenizer as the target";
          message_ = "invalid option draft: its tokenizer differs from " + baton_.path + "'s (" + mismatch + "): drafts would be other tokens";
          return;
        }
        engine.draft_model = baton_.draft->model;
        host_->draft = baton_.draft;  // lent from here on: returned by shutdown()
        host_->draft->lend();
      }
      host_->engine = std::make_unique<Engine>(host_->model, engine, [events, weak]() mutable {
        events.NonBlockingCall([weak](Napi::Env env, Napi::Function fn) {
          if (auto h = weak.lock()) NativeModel::Deliver(env, fn, *h);
        });
      });
      host_->placement = device_placement(host_->model, host_->engine->context(), host_->engine->draft_context());
      const std::string lost_now = rpc_failure(baton_.offload.rpc_servers);
      if (!lost_now.empty()) {
        code_ = "RPC_DISCONNECTED";
        message_ = "the RPC server " + lost_now + " while creating the context for " + baton_.path;
      }
    } catch (const InvalidEngineOption& e) {
      // Options the engine checks against the model or each other (expertStats, kvBudget).
      code_ = "INVALID_OPTION";
      option_ = e.option;
      expected_ = e.expected;
      message_ = "invalid option " + e.option + ": " + baton_.path + ": " + e.what();
    } catch (const std::exception& e) {
      const std::string reason = capture.text();
      code_ = "MODEL_LOAD_FAILED";
      message_ = std::string(e.what()) + (reason.empty() ? std::string() : ": " + trim(reason));
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    progress_state_->settled = true;
    if (code_.empty() && !on_progress_.IsEmpty() && progress_state_->delivered < 1.0f) {
      on_progress_.Call({Napi::Number::New(env, 1.0)});
    }
    release_progress();
    if (!code_.empty()) {
      host_->shutdown();
      Napi::Error error = CodedError(env, code_, message_, baton_.path);
      if (!option_.empty()) {
        error.Set("option", option_);
        error.Set("expected", expected_);
      }
      deferred_.Reject(error.Value());
      return;
    }
    deferred_.Resolve(NativeModel::Wrap(env, host_));
  }

  void OnError(const Napi::Error& error) override {
    progress_state_->settled = true;
    release_progress();
    host_->shutdown();
    deferred_.Reject(error.Value());
  }

 private:

  void release_progress() {
    if (progress_) {
      progress_.Release();
      progress_ = Napi::ThreadSafeFunction();
    }
  }

  Napi::Promise::Deferred deferred_;
  LoadBaton baton_;
  std::shared_ptr<Host> host_;
  Napi::ThreadSafeFunction progress_;
  Napi::FunctionReference on_progress_;
  std::shared_ptr<ProgressState> progress_state_ = std::make_shared<ProgressState>();
  int last_percent_ = -1;
  std::string code_;
  std::string message_;
  std::string option_;
  std::string expected_;
};

class CloseWorker : public Napi::AsyncWorker {
 public:
  CloseWorker(Napi::Env env, std::shared_ptr<Host> host)
      : Napi::AsyncWorker(env, "genesis.close"), deferred_(Napi::Promise::Deferred::New(env)), host_(std::move(host)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  // The engine thread may be inside a decode step: waiting for it must not block JS.
  void Execute() override {
    host_->wait_jobs();
    if (host_->engine) {
      host_->engine->stop();
      host_->engine->join();
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    // Requests still in flight learn they were disposed before close() resolves.
    if (host_->engine) deliver_pending(env);
    host_->shutdown();
    deferred_.Resolve(env.Undefined());
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

  void set_deliver(Napi::Function fn) { on_events_ = Napi::Persistent(fn); }

 private:
  void deliver_pending(Napi::Env env) {
    if (!on_events_.IsEmpty()) NativeModel::Deliver(env, on_events_.Value(), *host_);
  }

  Napi::Promise::Deferred deferred_;
  std::shared_ptr<Host> host_;
  Napi::FunctionReference on_events_;
};

// An async job on a model: counted from construction (JS thread) to the end of Execute, so that
// close() and finalizers wait for it before freeing the model. Errors are carried as a message.
class HostJob : public Napi::AsyncWorker {
 public:
  HostJob(Napi::Env env, const char* name, std::shared_ptr<Host> host)
      : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)), host_(std::move(host)) {
    std::lock_guard<std::mutex> lock(host_->jobs_mu);
    host_->jobs_in_flight++;
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() final {
    try {
      Run();
    } catch (const std::exception& e) {
      error_ = e.what();
    }
    std::lock_guard<std::mutex> lock(host_->jobs_mu);
    host_->jobs_in_flight--;
    host_->jobs_idle.notify_all();
  }

  void OnOK() final {
    Napi::Env env = Env();
    if (!error_.empty()) {
      deferred_.Reject(CodedError(env, error_code_, error_).Value());
      return;
    }
    deferred_.Resolve(Result(env));
  }

 protected:
  virtual void Run() = 0;
  virtual Napi::Value Result(Napi::Env env) = 0;

  Napi::Promise::Deferred deferred_;
  std::shared_ptr<Host> host_;
  std::string error_;
  const char* error_code_ = "ENGINE";
};

class EmbedWorker : public HostJob {
 public:
  EmbedWorker(Napi::Env env, std::shared_ptr<Host> host, std::vector<std::vector<llama_token>> inputs)
      : HostJob(env, "genesis.embed", std::move(host)), inputs_(std::move(inputs)) {}

 private:
  void Run() override {
    check_rpc();
    {
      std::lock_guard<std::mutex> lock(host_->jobs_mu);
      if (!host_->embedder) {
        const int32_t threads = host_->threads > 0 ? host_->threads : static_cast<int32_t>(std::thread::hardware_concurrency());
        host_->embedder = std::make_unique<Embedder>(host_->model, host_->engine->context_size(), threads);
      }
    }
    result_ = host_->embedder->embed(inputs_);
    pooling_ = host_->embedder->pooling();
    check_rpc();  // a connection lost during the computation reads as zeros: no result
  }

  void check_rpc() {
    const std::string lost = rpc_failure(host_->offload.rpc_servers);
    if (!lost.empty()) {
      error_code_ = "RPC_DISCONNECTED";
      throw std::runtime_error("the RPC server " + lost + ". Dispose the model and load it again once the server is back");
    }
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Array vectors = Napi::Array::New(env, result_.size());
    for (size_t i = 0; i < result_.size(); ++i) {
      auto v = Napi::Float32Array::New(env, result_[i].size());
      std::copy(result_[i].begin(), result_[i].end(), v.Data());
      vectors.Set(static_cast<uint32_t>(i), v);
    }
    Napi::Object out = Napi::Object::New(env);
    out.Set("embeddings", vectors);
    out.Set("pooling", pooling_);
    return out;
  }

  std::vector<std::vector<llama_token>> inputs_;
  std::vector<std::vector<float>> result_;
  std::string pooling_;
};

class TokenizeWorker : public HostJob {
 public:
  TokenizeWorker(Napi::Env env, std::shared_ptr<Host> host, std::string text, bool add_special, bool parse_special)
      : HostJob(env, "genesis.tokenize", std::move(host)), text_(std::move(text)), add_special_(add_special), parse_special_(parse_special) {
    error_code_ = "TOKENIZE";
  }

 private:
  void Run() override { tokens_ = tokenize_text(llama_model_get_vocab(host_->model), text_, add_special_, parse_special_); }

  Napi::Value Result(Napi::Env env) override {
    auto array = Napi::Int32Array::New(env, tokens_.size());
    std::copy(tokens_.begin(), tokens_.end(), array.Data());
    return array;
  }

  std::string text_;
  bool add_special_;
  bool parse_special_;
  std::vector<llama_token> tokens_;
};

int32_t get_int(const Napi::Object& obj, const char* key, int32_t fallback) {
  Napi::Value v = obj.Get(key);
  return v.IsNumber() ? v.As<Napi::Number>().Int32Value() : fallback;
}

// A byte or token count (options.ts checked it); 0 when absent or out of range.
uint64_t get_u64(const Napi::Object& obj, const char* key) {
  const Napi::Value v = obj.Get(key);
  const double bytes = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : 0.0;
  return bytes > 0 && bytes < 9.0e18 ? static_cast<uint64_t>(bytes) : 0;
}

// Expert counts per layer, as expertStats() returns them ({ layer, counts }[]); empty when absent.
std::vector<ExpertLayerCounts> expert_counts_from_js(Napi::Env env, const Napi::Value& value, const char* what) {
  std::vector<ExpertLayerCounts> out;
  if (value.IsUndefined() || value.IsNull()) return out;
  const std::string expected = std::string("invalid option ") + what + ": expected an array of { layer, counts } (as expertStats() returns)";
  if (!value.IsArray()) throw CodedError(env, "INVALID_OPTION", expected);
  Napi::Array layers = value.As<Napi::Array>();
  for (uint32_t i = 0; i < layers.Length(); ++i) {
    Napi::Value item = layers.Get(i);
    if (!item.IsObject()) throw CodedError(env, "INVALID_OPTION", expected);
    Napi::Object layer = item.As<Napi::Object>();
    Napi::Value il = layer.Get("layer");
    Napi::Value counts = layer.Get("counts");
    if (!il.IsNumber() || !(counts.IsArray() || counts.IsTypedArray())) throw CodedError(env, "INVALID_OPTION", expected);
    ExpertLayerCounts c;
    c.layer = il.As<Napi::Number>().Int32Value();
    Napi::Object values = counts.As<Napi::Object>();
    const uint32_t n = values.Get("length").As<Napi::Number>().Uint32Value();
    for (uint32_t e = 0; e < n; ++e) {
      Napi::Value v = values.Get(e);
      const double x = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1.0;
      if (!(x >= 0.0) || !std::isfinite(x)) {
        throw CodedError(env, "INVALID_OPTION", std::string("invalid option ") + what + ": counts must be finite numbers >= 0");
      }
      c.counts.push_back(static_cast<uint64_t>(x));
    }
    out.push_back(std::move(c));
  }
  return out;
}

bool get_bool(const Napi::Object& obj, const char* key, bool fallback) {
  Napi::Value v = obj.Get(key);
  return v.IsBoolean() ? v.As<Napi::Boolean>().Value() : fallback;
}

// A KV cache type by its ggml name: the types llama.cpp's -ctk/-ctv accept. Absent: F16.
ggml_type kv_cache_type(Napi::Env env, const Napi::Object& obj, const char* key) {
  static const ggml_type allowed[] = {GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q8_0,  GGML_TYPE_Q4_0,
                                      GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_IQ4_NL};
  Napi::Value v = obj.Get(key);
  if (v.IsUndefined()) return GGML_TYPE_F16;
  const std::string name = v.IsString() ? v.As<Napi::String>().Utf8Value() : std::string();
  for (ggml_type t : allowed) {
    if (name == ggml_type_name(t)) return t;
  }
  throw CodedError(env, "INVALID_OPTION", std::string("invalid option kvCacheType: expected f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 or iq4_nl"));
}

// The options loadModel and estimateMemory share (validated in src/options.ts first).
LoadBaton load_baton(Napi::Env env, const std::string& path, const Napi::Object& opts) {
  LoadBaton baton;
  baton.path = path;
  baton.offload.gpu_layers = get_int(opts, "gpuLayers", 0);
  baton.offload.use_mmap = get_bool(opts, "useMmap", true);
  baton.offload.cpu_moe_layers = static_cast<uint32_t>(std::max(0, get_int(opts, "cpuMoeLayers", 0)));
  const int32_t split = get_int(opts, "splitMode", LLAMA_SPLIT_MODE_LAYER);
  if (split < LLAMA_SPLIT_MODE_NONE || split > LLAMA_SPLIT_MODE_TENSOR) {
    throw CodedError(env, "INVALID_OPTION", "invalid option splitMode: expected 0..3, got " + std::to_string(split));
  }
  baton.offload.split_mode = static_cast<llama_split_mode>(split);
  baton.offload.main_gpu = std::max(0, get_int(opts, "mainGpu", 0));
  Napi::Value ts = opts.Get("tensorSplit");
  if (ts.IsArray()) {
    Napi::Array a = ts.As<Napi::Array>();
    if (a.Length() > llama_max_devices()) {
      throw CodedError(env, "INVALID_OPTION", "invalid option tensorSplit: at most " + std::to_string(llama_max_devices()) + " proportions");
    }
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value v = a.Get(i);
      const double x = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1.0;
      if (!(x >= 0.0) || !std::isfinite(x)) throw CodedError(env, "INVALID_OPTION", "invalid option tensorSplit: proportions must be finite numbers >= 0");
      baton.offload.tensor_split.push_back(static_cast<float>(x));
    }
  }
  Napi::Value rpc = opts.Get("rpcServers");
  if (rpc.IsArray()) {
    Napi::Array a = rpc.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value v = a.Get(i);
      if (!v.IsString()) throw CodedError(env, "INVALID_OPTION", "invalid option rpcServers: expected host:port strings");
      baton.offload.rpc_servers.push_back(v.As<Napi::String>().Utf8Value());
    }
  }
  baton.engine.context_size = static_cast<uint32_t>(std::max(1, get_int(opts, "contextSize", 4096)));
  baton.engine.max_sequences = static_cast<uint32_t>(std::max(1, get_int(opts, "maxSequences", 4)));
  baton.engine.batch_size = static_cast<uint32_t>(std::max(1, get_int(opts, "batchSize", 512)));
  baton.engine.threads = get_int(opts, "threads", 0);
  baton.engine.kv_unified = get_bool(opts, "kvUnified", false);
  baton.engine.kv_budget = static_cast<uint32_t>(std::max(0, get_int(opts, "kvBudget", 0)));
  baton.engine.kv_paged = get_bool(opts, "kvPaged", false);
  baton.engine.kv_block_size = static_cast<uint32_t>(std::max(1, get_int(opts, "kvBlockSize", 1)));
  baton.engine.type_k = kv_cache_type(env, opts, "kvCacheTypeK");
  baton.engine.type_v = kv_cache_type(env, opts, "kvCacheTypeV");
  baton.engine.deterministic = get_bool(opts, "deterministic", false);
  baton.engine.prompt_cache = get_bool(opts, "promptCache", true);
  baton.engine.state_checkpoints = static_cast<uint32_t>(std::max(0, get_int(opts, "stateCheckpoints", 4)));
  baton.engine.state_checkpoint_memory = get_u64(opts, "stateCheckpointMemory");
  baton.engine.kv_swap_memory = get_u64(opts, "kvSwapMemory");
  baton.engine.flash_attention = get_int(opts, "flashAttention", -1);
  baton.engine.max_queue = static_cast<uint32_t>(std::max(0, get_int(opts, "maxQueue", 0)));
  baton.engine.expert_stats = get_bool(opts, "expertStats", false);
  baton.engine.gpu_experts = static_cast<uint32_t>(std::max(0, get_int(opts, "gpuExperts", 0)));
  baton.offload.plain_host_weights = baton.engine.gpu_experts > 0;
  baton.engine.expert_heat = expert_counts_from_js(env, opts.Get("expertHeat"), "expertHeat");
  baton.engine.expert_replace_tokens = get_u64(opts, "expertReplaceTokens");
  baton.engine.moe_group_topk = get_bool(opts, "fusedMoeRouting", false);
  Napi::Value draft = opts.Get("draft");
  if (!draft.IsUndefined() && !draft.IsNull()) {
    baton.draft = NativeModel::HostOf(env, draft);
    if (!baton.draft) throw CodedError(env, "INVALID_OPTION", "invalid option draft: expected a loaded model that is not disposed");
    baton.engine.draft_max = static_cast<uint32_t>(std::max(1, get_int(opts, "draftMaxTokens", 4)));
  } else if (get_bool(opts, "draftMtp", false)) {
    baton.engine.mtp = true;
    baton.offload.load_mtp = true;
    baton.engine.draft_max = static_cast<uint32_t>(std::max(1, get_int(opts, "draftMaxTokens", 4)));
  }
  if (baton.engine.max_sequences > llama_max_parallel_sequences()) {
    throw CodedError(env, "INVALID_OPTION",
                     "invalid option maxSequences: expected at most " + std::to_string(llama_max_parallel_sequences()) + ", got " +
                         std::to_string(baton.engine.max_sequences));
  }
  return baton;
}

class EstimateWorker : public Napi::AsyncWorker {
 public:
  EstimateWorker(Napi::Env env, LoadBaton baton)
      : Napi::AsyncWorker(env, "genesis.estimateMemory"), deferred_(Napi::Promise::Deferred::New(env)), baton_(std::move(baton)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    LogCapture capture;
    try {
      estimate_ = estimate_memory(baton_.path, baton_.offload, baton_.engine);
    } catch (const OptionError& e) {
      code_ = "INVALID_OPTION";
      message_ = e.what();
    } catch (const RpcError& e) {
      code_ = e.code;
      message_ = e.what();
    } catch (const std::exception& e) {
      const std::string reason = capture.text();
      message_ = std::string(e.what()) + (reason.empty() ? std::string() : ": " + trim(reason));
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (!message_.empty()) {
      deferred_.Reject(CodedError(env, code_, message_, baton_.path).Value());
      return;
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("devices", devices_to_js(env, estimate_.devices));
    r.Set("contextCells", estimate_.n_ctx);
    r.Set("layers", estimate_.n_layer);
    r.Set("experts", estimate_.n_expert);
    r.Set("parameters", static_cast<double>(estimate_.n_params));
    deferred_.Resolve(r);
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  LoadBaton baton_;
  MemoryEstimate estimate_;
  std::string code_ = "MODEL_LOAD_FAILED";
  std::string message_;
};

}  // namespace

// estimateMemory(path, options): what loadModel(path, options) would take per device, without loading.
Napi::Value EstimateMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsObject()) {
    throw CodedError(env, "NATIVE_BINDING", "estimateMemory(path: string, options: object)");
  }
  auto* worker = new EstimateWorker(env, load_baton(env, info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Object>()));
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value LoadModel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsString() || !info[1].IsObject() || !info[3].IsFunction()) {
    throw CodedError(env, "NATIVE_BINDING", "loadModel(path: string, options: object, onProgress?: function, onEvents: function)");
  }
  LoadBaton baton = load_baton(env, info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Object>());
  Napi::Function on_progress = info[2].IsFunction() ? info[2].As<Napi::Function>() : Napi::Function();
  auto* worker = new LoadWorker(env, std::move(baton), on_progress, info[3].As<Napi::Function>());
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

// ---------------------------------------------------------------------------------------------
// NativeModel

namespace {
// Per-environment data: the addon may be loaded in the main thread and in worker threads at once.
struct AddonData {
  Napi::FunctionReference model_constructor;
};
}  // namespace

std::shared_ptr<Host> NativeModel::HostOf(Napi::Env env, Napi::Value value) {
  if (!value.IsObject()) return nullptr;
  auto* data = env.GetInstanceData<AddonData>();
  if (data == nullptr || !value.As<Napi::Object>().InstanceOf(data->model_constructor.Value())) return nullptr;
  NativeModel* m = NativeModel::Unwrap(value.As<Napi::Object>());
  if (m == nullptr || !m->host_ || m->host_->closed || m->host_->closing || m->host_->model == nullptr) return nullptr;
  return m->host_;
}

Napi::Function NativeModel::Define(Napi::Env env) {
  Napi::Function ctor = DefineClass(env, "NativeModel",
                                    {
                                        InstanceMethod<&NativeModel::Info>("info"),
                                        InstanceMethod<&NativeModel::Tokenize>("tokenize"),
                                        InstanceMethod<&NativeModel::Detokenize>("detokenize"),
                                        InstanceMethod<&NativeModel::ApplyChatTemplate>("applyChatTemplate"),
                                        InstanceMethod<&NativeModel::Submit>("submit"),
                                        InstanceMethod<&NativeModel::Feed>("feed"),
                                        InstanceMethod<&NativeModel::VocabDigest>("vocabDigest"),
                                        InstanceMethod<&NativeModel::Cancel>("cancel"),
                                        InstanceMethod<&NativeModel::Stats>("stats"),
                                        InstanceMethod<&NativeModel::ExpertStats>("expertStats"),
                                        InstanceMethod<&NativeModel::ExpertPlacement>("expertPlacement"),
                                        InstanceMethod<&NativeModel::PlaceExperts>("placeExperts"),
                                        InstanceMethod<&NativeModel::Embed>("embed"),
                                        InstanceMethod<&NativeModel::TokenizeAsync>("tokenizeAsync"),
                                        InstanceMethod<&NativeModel::Close>("close"),
                                    });
  auto* data = new AddonData();
  data->model_constructor = Napi::Persistent(ctor);
  env.SetInstanceData<AddonData>(data);
  return ctor;
}

Napi::Object NativeModel::Wrap(Napi::Env env, std::shared_ptr<Host> host) {
  auto* holder = new std::shared_ptr<Host>(std::move(host));
  return env.GetInstanceData<AddonData>()->model_constructor.New({Napi::External<std::shared_ptr<Host>>::New(env, holder)});
}

NativeModel::NativeModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModel>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw CodedError(info.Env(), "NATIVE_BINDING", "NativeModel is created by loadModel(), not with new");
  }
  auto* holder = info[0].As<Napi::External<std::shared_ptr<Host>>>().Data();
  host_ = std::move(*holder);
  delete holder;
  env_ = info.Env();
  // A process that exits with models still loaded must stop their threads before Node tears down.
  if (napi_add_env_cleanup_hook(env_, OnEnvCleanup, host_.get()) == napi_ok) cleanup_hook_ = true;
}

NativeModel::~NativeModel() {
  if (cleanup_hook_) napi_remove_env_cleanup_hook(env_, OnEnvCleanup, host_.get());
  if (host_) host_->shutdown();
}

void NativeModel::OnEnvCleanup(void* host) {
  auto* h = static_cast<Host*>(host);
  if (h->engine) {
    h->engine->stop();
    h->engine->join();
  }
}

void NativeModel::EnsureOpen(Napi::Env env) const {
  if (!host_ || host_->closed || host_->closing || !host_->engine) throw CodedError(env, "DISPOSED", "the model has been disposed");
}

void NativeModel::Deliver(Napi::Env env, Napi::Function on_events, Host& host) {
  if (!host.engine) return;
  std::vector<Event> events = host.engine->drain();
  if (events.empty()) return;
  uint32_t finished = 0;
  for (const auto& e : events) {
    if (e.kind == Event::Kind::Done || e.kind == Event::Kind::Error) finished++;  // Tokens and Logits: still running
  }
  Napi::Array array = events_to_js(env, events);
  host.active = host.active > finished ? host.active - finished : 0;
  if (host.active == 0 && host.events) host.events.Unref(env);
  on_events.Call({array});
}

Napi::Value NativeModel::Info(const Napi::CallbackInfo& info) {
  EnsureOpen(info.Env());
  Napi::Env env = info.Env();
  Napi::Object o = model_info(env, host_->model, *host_->engine);
  // What sits where: split settings as loaded and, per device, its bytes and layers.
  static const char* const modes[] = {"none", "layer", "row", "tensor"};
  const OffloadOptions& off = host_->offload;
  Napi::Object placement = Napi::Object::New(env);
  placement.Set("splitMode", modes[off.split_mode]);
  placement.Set("mainGpu", off.main_gpu);
  Napi::Array split = Napi::Array::New(env, off.tensor_split.size());
  for (size_t i = 0; i < off.tensor_split.size(); ++i) split.Set(static_cast<uint32_t>(i), off.tensor_split[i]);
  placement.Set("tensorSplit", split);
  Napi::Array rpc = Napi::Array::New(env, off.rpc_servers.size());
  for (size_t i = 0; i < off.rpc_servers.size(); ++i) rpc.Set(static_cast<uint32_t>(i), off.rpc_servers[i]);
  placement.Set("rpcServers", rpc);
  placement.Set("devices", devices_to_js(env, host_->placement));
  o.Set("placement", placement);
  return o;
}

namespace {

struct TokenizeArgs {
  std::string text;
  bool add_special;
  bool parse_special;
};

// (text, addSpecial = true, parseSpecial = true)
TokenizeArgs tokenize_args(const Napi::CallbackInfo& info, const char* method) {
  if (info.Length() < 1 || !info[0].IsString()) {
    throw CodedError(info.Env(), "INVALID_OPTION", std::string(method) + "(text): expected a string");
  }
  return {info[0].As<Napi::String>().Utf8Value(), info.Length() > 1 && info[1].IsBoolean() ? info[1].As<Napi::Boolean>().Value() : true,
          info.Length() > 2 && info[2].IsBoolean() ? info[2].As<Napi::Boolean>().Value() : true};
}

}  // namespace

Napi::Value NativeModel::Tokenize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  const TokenizeArgs args = tokenize_args(info, "tokenize");
  std::vector<llama_token> tokens;
  try {
    tokens = tokenize_text(llama_model_get_vocab(host_->model), args.text, args.add_special, args.parse_special);
  } catch (const std::exception& e) {
    throw CodedError(env, "TOKENIZE", e.what());
  }
  auto array = Napi::Int32Array::New(env, tokens.size());
  std::copy(tokens.begin(), tokens.end(), array.Data());
  return array;
}

Napi::Value NativeModel::TokenizeAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  TokenizeArgs args = tokenize_args(info, "tokenizeAsync");
  auto* worker = new TokenizeWorker(env, host_, std::move(args.text), args.add_special, args.parse_special);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value NativeModel::Detokenize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  const llama_vocab* vocab = llama_model_get_vocab(host_->model);
  std::vector<llama_token> tokens = tokens_from_js(env, info[0], llama_vocab_n_tokens(vocab), "tokens");
  const bool remove_special = info.Length() > 1 && info[1].IsBoolean() ? info[1].As<Napi::Boolean>().Value() : false;
  const bool unparse_special = info.Length() > 2 && info[2].IsBoolean() ? info[2].As<Napi::Boolean>().Value() : false;
  std::string text(tokens.size() * 8 + 16, '\0');
  int32_t n = llama_detokenize(vocab, tokens.data(), static_cast<int32_t>(tokens.size()), text.data(), static_cast<int32_t>(text.size()), remove_special, unparse_special);
  if (n < 0) {
    text.resize(static_cast<size_t>(-n));
    n = llama_detokenize(vocab, tokens.data(), static_cast<int32_t>(tokens.size()), text.data(), static_cast<int32_t>(text.size()), remove_special, unparse_special);
  }
  if (n < 0) throw CodedError(env, "TOKENIZE", "llama.cpp could not detokenize the tokens");
  text.resize(static_cast<size_t>(n));
  return Napi::String::New(env, text);
}

Napi::Value NativeModel::ApplyChatTemplate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  if (info.Length() < 1 || !info[0].IsArray()) throw CodedError(env, "INVALID_OPTION", "applyChatTemplate(messages): expected an array");
  Napi::Array messages = info[0].As<Napi::Array>();
  const bool add_assistant = info.Length() > 1 && info[1].IsBoolean() ? info[1].As<Napi::Boolean>().Value() : true;
  std::string custom;
  if (info.Length() > 2 && info[2].IsString()) custom = info[2].As<Napi::String>().Utf8Value();
  const char* tmpl = custom.empty() ? llama_model_chat_template(host_->model, nullptr) : custom.c_str();
  if (tmpl == nullptr) {
    throw CodedError(env, "CHAT_TEMPLATE", "the model has no chat template (tokenizer.chat_template); pass one with the chatTemplate option");
  }
  std::vector<std::string> roles, contents;
  size_t total = 0;
  for (uint32_t i = 0; i < messages.Length(); ++i) {
    Napi::Value v = messages.Get(i);
    if (!v.IsObject()) throw CodedError(env, "INVALID_OPTION", "messages[" + std::to_string(i) + "]: expected { role, content }");
    Napi::Object m = v.As<Napi::Object>();
    if (!m.Get("role").IsString() || !m.Get("content").IsString()) {
      throw CodedError(env, "INVALID_OPTION", "messages[" + std::to_string(i) + "]: expected string role and content");
    }
    roles.push_back(m.Get("role").As<Napi::String>().Utf8Value());
    contents.push_back(m.Get("content").As<Napi::String>().Utf8Value());
    total += roles.back().size() + contents.back().size();
  }
  std::vector<llama_chat_message> chat(roles.size());
  for (size_t i = 0; i < roles.size(); ++i) chat[i] = {roles[i].c_str(), contents[i].c_str()};
  std::string out(total * 2 + 256, '\0');
  int32_t n = llama_chat_apply_template(tmpl, chat.data(), chat.size(), add_assistant, out.data(), static_cast<int32_t>(out.size()));
  if (n > static_cast<int32_t>(out.size())) {
    out.resize(static_cast<size_t>(n));
    n = llama_chat_apply_template(tmpl, chat.data(), chat.size(), add_assistant, out.data(), static_cast<int32_t>(out.size()));
  }
  if (n < 0) {
    throw CodedError(env, "CHAT_TEMPLATE",
                     "the model's chat template is not one llama.cpp supports without a Jinja engine; pass a supported template with the chatTemplate option");
  }
  out.resize(static_cast<size_t>(n));
  return Napi::String::New(env, out);
}

Napi::Value NativeModel::Submit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  if (info.Length() < 3 || !info[0].IsNumber() || !info[2].IsObject()) {
    throw CodedError(env, "NATIVE_BINDING", "submit(id: number, prompt: Int32Array, options: object)");
  }
  const llama_vocab* vocab = llama_model_get_vocab(host_->model);
  Request request = request_from_js(env, info[0], info[1], info[2].As<Napi::Object>(), llama_vocab_n_tokens(vocab));
  check_grammar(env, vocab, request.sampling.grammar);
  const uint32_t n_ctx = host_->engine->context_size();
  if (request.prompt.empty()) throw CodedError(env, "INVALID_OPTION", "the prompt is empty: expected at least one token");
  if (request.prompt.size() >= n_ctx) {
    throw CodedError(env, "CONTEXT_OVERFLOW",
                     "prompt has " + std::to_string(request.prompt.size()) + " tokens but the context holds " + std::to_string(n_ctx) +
                         " tokens per sequence (at least one must be left to generate); shorten the prompt or load with a larger contextSize");
  }
  try {
    host_->engine->submit(std::move(request));
  } catch (const QueueFull& full) {
    throw CodedError(env, "QUEUE_FULL",
                     "the request queue is full: " + std::to_string(full.queued) + " requests already wait for a sequence (maxQueue " +
                         std::to_string(host_->engine->max_queue()) + "); retry later");
  } catch (const std::exception&) {
    throw CodedError(env, "DISPOSED", "the model has been disposed");
  }
  if (host_->active++ == 0) host_->events.Ref(env);
  return env.Undefined();
}

Napi::Value NativeModel::Feed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(host_->model));
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) throw CodedError(env, "NATIVE_BINDING", "feed(id: number, token: number)");
  const double token = info[1].As<Napi::Number>().DoubleValue();
  if (!(token >= 0 && token < n_vocab) || std::floor(token) != token) {
    throw CodedError(env, "INVALID_OPTION", "feed: token id " + std::to_string(token) + " is not in [0, " + std::to_string(n_vocab) + ")");
  }
  host_->engine->feed(static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value()), static_cast<llama_token>(token));
  return env.Undefined();
}

Napi::Value NativeModel::Cancel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!host_ || !host_->engine || info.Length() < 1 || !info[0].IsNumber()) return env.Undefined();
  host_->engine->cancel(static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value()));
  return env.Undefined();
}

// A digest of the tokenizer (type, then every token's text): models whose digests are equal map
// token ids to the same text, as logit fusion and speculative decoding need.
Napi::Value NativeModel::VocabDigest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  const llama_vocab* vocab = llama_model_get_vocab(host_->model);
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a, 64 bit
  auto mix = [&h](const char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 0x100000001b3ULL;
  };
  const int32_t type = llama_vocab_type(vocab);
  mix(reinterpret_cast<const char*>(&type), sizeof type);
  const int32_t n = llama_vocab_n_tokens(vocab);
  for (llama_token t = 0; t < n; ++t) {
    const char* text = llama_vocab_get_text(vocab, t);
    mix(text, std::strlen(text) + 1);
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return Napi::String::New(env, std::to_string(n) + ":" + hex);
}

Napi::Value NativeModel::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  const EngineStats s = host_->engine->stats();
  Napi::Object out = Napi::Object::New(env);
  out.Set("active", s.active);
  out.Set("queued", s.queued);
  out.Set("steps", static_cast<double>(s.steps));
  out.Set("decodedTokens", static_cast<double>(s.decoded_tokens));
  out.Set("promptTokens", static_cast<double>(s.prompt_tokens));
  out.Set("cachedPromptTokens", static_cast<double>(s.cached_prompt_tokens));
  out.Set("kvUsedTokens", static_cast<double>(s.kv_used_tokens));
  out.Set("draftTokens", static_cast<double>(s.draft_tokens));
  out.Set("acceptedDraftTokens", static_cast<double>(s.draft_accepted));
  out.Set("sharedPrefixCopies", static_cast<double>(s.shared_prefix_copies));
  out.Set("stateCheckpointRestores", static_cast<double>(s.state_checkpoint_restores));
  out.Set("stateCheckpointBytes", static_cast<double>(s.state_checkpoint_bytes));
  out.Set("preemptions", static_cast<double>(s.preemptions));
  out.Set("kvPoolUsedTokens", static_cast<double>(s.kv_pool_used_tokens));
  out.Set("kvBlockSize", static_cast<double>(s.kv_block_size));
  out.Set("kvPoolBlocks", static_cast<double>(s.kv_pool_blocks));
  out.Set("kvPoolUsedBlocks", static_cast<double>(s.kv_pool_used_blocks));
  out.Set("kvSwapOuts", static_cast<double>(s.kv_swap_outs));
  out.Set("kvSwapIns", static_cast<double>(s.kv_swap_ins));
  out.Set("kvSwapBytes", static_cast<double>(s.kv_swap_bytes));
  Napi::Object time = Napi::Object::New(env);
  time.Set("step", static_cast<double>(s.step_ns) / 1e9);
  time.Set("decode", static_cast<double>(s.decode_ns) / 1e9);
  time.Set("wait", static_cast<double>(s.wait_ns) / 1e9);
  time.Set("sample", static_cast<double>(s.sample_ns) / 1e9);
  out.Set("seconds", time);
  out.Set("kvCapacityTokens", s.kv_pool_tokens > 0 ? static_cast<double>(s.kv_pool_tokens)
                                                    : static_cast<double>(host_->engine->context_size()) * host_->engine->max_sequences());
  return out;
}

// Reads the engine's expert counters between two steps, off the JS thread.
class ExpertStatsWorker : public HostJob {
 public:
  ExpertStatsWorker(Napi::Env env, std::shared_ptr<Host> host, bool reset)
      : HostJob(env, "genesis.expertStats", std::move(host)), reset_(reset) {}

 private:
  void Run() override {
    if (!host_->engine) throw std::runtime_error("the model was disposed");
    layers_ = host_->engine->expert_counts(reset_);
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Array out = Napi::Array::New(env, layers_.size());
    for (size_t i = 0; i < layers_.size(); ++i) {
      Napi::Object layer = Napi::Object::New(env);
      layer.Set("layer", layers_[i].layer);
      Napi::Float64Array counts = Napi::Float64Array::New(env, layers_[i].counts.size());
      for (size_t e = 0; e < layers_[i].counts.size(); ++e) counts[e] = static_cast<double>(layers_[i].counts[e]);
      layer.Set("counts", counts);
      out.Set(static_cast<uint32_t>(i), layer);
    }
    return out;
  }

  bool reset_;
  std::vector<ExpertLayerCounts> layers_;
};

Napi::Value NativeModel::ExpertStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  if (!host_->engine->expert_stats()) {
    throw CodedError(env, "INVALID_OPTION", "expert statistics are off for this model: load it with expertStats: true");
  }
  const bool reset = info.Length() > 0 && info[0].IsBoolean() && info[0].As<Napi::Boolean>().Value();
  auto* worker = new ExpertStatsWorker(env, host_, reset);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

namespace {

Napi::Value placement_to_js(Napi::Env env, const std::vector<genesis::ExpertPlacement>& layers) {
  Napi::Array out = Napi::Array::New(env, layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    Napi::Object layer = Napi::Object::New(env);
    layer.Set("layer", layers[i].layer);
    Napi::Int32Array experts = Napi::Int32Array::New(env, layers[i].experts.size());
    for (size_t e = 0; e < layers[i].experts.size(); ++e) experts[e] = layers[i].experts[e];
    layer.Set("experts", experts);
    layer.Set("bytes", static_cast<double>(layers[i].bytes));
    layer.Set("routed", static_cast<double>(layers[i].routed));
    layer.Set("routedToCopies", static_cast<double>(layers[i].routed_to_copies));
    out.Set(static_cast<uint32_t>(i), layer);
  }
  return out;
}

// Reads the expert placement, or (with heat) chooses the copied experts again, between two steps,
// off the JS thread.
class PlacementWorker : public HostJob {
 public:
  PlacementWorker(Napi::Env env, std::shared_ptr<Host> host, std::optional<std::vector<ExpertLayerCounts>> heat)
      : HostJob(env, "genesis.expertPlacement", std::move(host)), heat_(std::move(heat)) {}

 private:
  void Run() override {
    if (!host_->engine) throw std::runtime_error("the model was disposed");
    layers_ = heat_ ? host_->engine->place_experts(*heat_) : host_->engine->expert_placement();
    error_text_ = host_->engine->expert_placement_error();
  }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object out = Napi::Object::New(env);
    out.Set("layers", placement_to_js(env, layers_));
    if (!error_text_.empty()) out.Set("error", error_text_);
    return out;
  }

  std::optional<std::vector<ExpertLayerCounts>> heat_;
  std::vector<genesis::ExpertPlacement> layers_;
  std::string error_text_;
};

void ensure_placement(Napi::Env env, const Engine& engine) {
  if (!engine.expert_placement_on()) {
    throw CodedError(env, "INVALID_OPTION", "expert placement is off for this model: load it with gpuExperts (and cpuMoeLayers)");
  }
}

}  // namespace

Napi::Value NativeModel::ExpertPlacement(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  ensure_placement(env, *host_->engine);
  auto* worker = new PlacementWorker(env, host_, std::nullopt);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value NativeModel::PlaceExperts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  ensure_placement(env, *host_->engine);
  std::vector<ExpertLayerCounts> heat = expert_counts_from_js(env, info.Length() > 0 ? info[0] : env.Undefined(), "heat");
  try {
    host_->engine->check_heat(heat);
  } catch (const InvalidEngineOption& e) {
    throw CodedError(env, "INVALID_OPTION", "invalid option heat: " + std::string(e.what()));
  }
  auto* worker = new PlacementWorker(env, host_, std::move(heat));
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value NativeModel::Embed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EnsureOpen(env);
  if (info.Length() < 1 || !info[0].IsArray()) throw CodedError(env, "NATIVE_BINDING", "embed(inputs: Int32Array[])");
  Napi::Array array = info[0].As<Napi::Array>();
  const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(host_->model));
  const uint32_t n_ctx = host_->engine->context_size();
  std::vector<std::vector<llama_token>> inputs;
  for (uint32_t i = 0; i < array.Length(); ++i) {
    std::string what = "input[" + std::to_string(i) + "]";
    inputs.push_back(tokens_from_js(env, array.Get(i), n_vocab, what.c_str()));
    if (inputs.back().empty() || inputs.back().size() > n_ctx) {
      throw CodedError(env, "CONTEXT_OVERFLOW", what + " has " + std::to_string(inputs.back().size()) + " tokens; expected 1 to " + std::to_string(n_ctx));
    }
  }
  auto* worker = new EmbedWorker(env, host_, std::move(inputs));
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

Napi::Value NativeModel::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!host_ || host_->closed || host_->closing) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Resolve(env.Undefined());
    return d.Promise();
  }
  if (host_->is_lent()) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Reject(CodedError(env, "MODEL_IN_USE", "the model is the draft model of another loaded model: dispose that one first").Value());
    return d.Promise();
  }
  if (cleanup_hook_) {
    napi_remove_env_cleanup_hook(env_, OnEnvCleanup, host_.get());
    cleanup_hook_ = false;
  }
  host_->closing = true;
  auto* worker = new CloseWorker(env, host_);
  if (info.Length() > 0 && info[0].IsFunction()) worker->set_deliver(info[0].As<Napi::Function>());
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

}  // namespace genesis
