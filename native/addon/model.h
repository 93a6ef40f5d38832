// NativeModel: one loaded model with its context and batching engine, wrapped for JS.
//
// Ownership: a Host owns the llama model, the engine (which owns the llama context) and the
// ThreadSafeFunction that carries engine events to JS. It is shared between the JS object and the
// callbacks queued on the TSFN, so a late callback after close finds an empty host, never freed memory.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <napi.h>

#include "engine/embedder.h"
#include "engine/engine.h"
#include "engine/memory.h"

namespace genesis {

struct Host {
  llama_model* model = nullptr;
  std::unique_ptr<Engine> engine;
  int32_t threads = 0;
  OffloadOptions offload;                 // as loaded: split mode, proportions, RPC servers
  std::vector<DeviceMemory> placement;    // what sits where, measured after the load
  // Created on the first embed() call (under jobs_mu).
  std::unique_ptr<Embedder> embedder;
  // Async jobs (embed, tokenizeAsync) run on the libuv pool and use the model: shutdown waits for them.
  std::mutex jobs_mu;
  std::condition_variable jobs_idle;
  uint32_t jobs_in_flight = 0;
  Napi::ThreadSafeFunction events;  // calls JS onEvents(events[])
  uint32_t active = 0;              // requests submitted and not finished (JS thread only)
  bool closing = false;  // close() in progress (JS thread only)
  bool closed = false;
  // Speculative decoding: the draft model's host, lent to this host's engine. A host lent out
  // keeps its llama_model until every borrower gave it back, even when it is shut down first
  // (environment teardown); close() of a lent model is refused instead (MODEL_IN_USE).
  std::shared_ptr<Host> draft;
  std::mutex lend_mu;
  int lent = 0;
  llama_model* orphaned = nullptr;  // shut down while lent: freed by the last give_back()
  void lend();
  void give_back();
  bool is_lent();

  ~Host();
  // Stops the engine thread and frees native resources; safe to call twice.
  void shutdown();
  // Blocks until no async job runs (close and finalizers call it before freeing the model).
  void wait_jobs();
};

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  static Napi::Function Define(Napi::Env env);
  static Napi::Object Wrap(Napi::Env env, std::shared_ptr<Host> host);

  explicit NativeModel(const Napi::CallbackInfo& info);
  ~NativeModel() override;

  // Converts and delivers events waiting in the engine outbox (JS thread).
  static void Deliver(Napi::Env env, Napi::Function on_events, Host& host);
  // The host of a NativeModel object (null when `value` is not one, or it is closed).
  static std::shared_ptr<Host> HostOf(Napi::Env env, Napi::Value value);

 private:
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value Tokenize(const Napi::CallbackInfo& info);
  Napi::Value Detokenize(const Napi::CallbackInfo& info);
  Napi::Value ApplyChatTemplate(const Napi::CallbackInfo& info);
  Napi::Value Submit(const Napi::CallbackInfo& info);
  Napi::Value Feed(const Napi::CallbackInfo& info);
  Napi::Value VocabDigest(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value ExpertStats(const Napi::CallbackInfo& info);
  Napi::Value ExpertPlacement(const Napi::CallbackInfo& info);
  Napi::Value PlaceExperts(const Napi::CallbackInfo& info);
  Napi::Value Embed(const Napi::CallbackInfo& info);
  Napi::Value TokenizeAsync(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  void EnsureOpen(Napi::Env env) const;

  static void OnEnvCleanup(void* host);

  std::shared_ptr<Host> host_;
  napi_env env_ = nullptr;
  bool cleanup_hook_ = false;
};

// Load a model and create its engine off the JS thread: loadModel(path, options, onProgress, onEvents).
Napi::Value LoadModel(const Napi::CallbackInfo& info);
Napi::Value EstimateMemory(const Napi::CallbackInfo& info);

// Token ids of text; throws std::runtime_error when llama.cpp cannot tokenize it.
std::vector<llama_token> tokenize_text(const llama_vocab* vocab, const std::string& text, bool add_special, bool parse_special);

// A JS Error carrying a `code` (and optionally `path`) that src/errors.ts maps to a typed class.
Napi::Error CodedError(Napi::Env env, const std::string& code, const std::string& message, const std::string& path = "");

}  // namespace genesis
