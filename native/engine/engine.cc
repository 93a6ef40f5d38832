#include "engine/engine.h"

#include "engine/memory.h"  // rpc_failure

#include "ggml-cpu.h"
#include "llama-ext.h"  // nextn hidden states (MTP drafting)

#include <algorithm>
#include <chrono>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace genesis {

namespace {

uint64_t elapsed_ns(std::chrono::steady_clock::time_point since) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - since).count());
}

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string token_piece(const llama_vocab* vocab, llama_token token) {
  std::string piece(64, '\0');
  int32_t n = llama_token_to_piece(vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0, false);
  if (n < 0) {
    piece.resize(static_cast<size_t>(-n));
    n = llama_token_to_piece(vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0, false);
  }
  piece.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return piece;
}

// How many leading tokens two sequences share.
size_t common_prefix(const std::vector<llama_token>& a, const std::vector<llama_token>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

// Appends one token of one sequence to a batch; returns its row.
int32_t batch_add(llama_batch& batch, llama_token token, llama_pos pos, llama_seq_id seq, bool logits) {
  const int32_t row = batch.n_tokens++;
  batch.token[row] = token;
  batch.pos[row] = pos;
  batch.n_seq_id[row] = 1;
  batch.seq_id[row][0] = seq;
  batch.logits[row] = logits ? 1 : 0;
  return row;
}

}  // namespace

llama_context_params engine_context_params(const EngineOptions& options) {
  auto params = llama_context_default_params();
  params.n_seq_max = options.max_sequences;
  // Every sequence may grow to context_size: in unified mode too, so a decode never runs out of cells.
  params.n_ctx = options.context_size * options.max_sequences;
  if (options.kv_unified && options.kv_budget > 0) params.n_ctx = options.kv_budget;
  params.n_batch = options.batch_size;
  params.n_ubatch = options.batch_size;
  const int32_t threads = engine_threads(options);
  params.n_threads = threads;
  params.n_threads_batch = threads;
  params.kv_unified = options.kv_unified;
  params.kv_paged = options.kv_unified && options.kv_paged;
  params.kv_block_size = params.kv_paged ? std::max<uint32_t>(1, options.kv_block_size) : 1;
  params.moe_group_topk = options.moe_group_topk;
  params.type_k = options.type_k;
  params.type_v = options.type_v;
  params.flash_attn_type = options.flash_attention < 0    ? LLAMA_FLASH_ATTN_TYPE_AUTO
                           : options.flash_attention == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                                                          : LLAMA_FLASH_ATTN_TYPE_ENABLED;
  params.no_perf = true;
  return params;
}

int32_t engine_threads(const EngineOptions& options) {
  return options.threads > 0 ? options.threads : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
}

Engine::Engine(llama_model* model, const EngineOptions& options, Notify notify)
    : model_(model), vocab_(llama_model_get_vocab(model)), notify_(std::move(notify)) {
  auto params = engine_context_params(options);
  const int32_t threads = params.n_threads;
  threads_ = std::max(1, threads);
  thread_scratch_.resize(static_cast<size_t>(threads_));
  const bool drafting = (options.draft_model != nullptr || options.mtp) && options.draft_max > 0 && !options.deterministic;
  const bool recurrent = llama_model_is_recurrent(model) || llama_model_is_hybrid(model);
  // A recurrent state cannot be cut back to a position; llama.cpp keeps snapshots of the last
  // n_rs_seq steps for architectures that support it, enough to drop up to draft_max rejected drafts.
  if (drafting && recurrent) params.n_rs_seq = options.draft_max;
  params.abort_callback = [](void* data) { return static_cast<std::atomic<bool>*>(data)->load(); };
  params.abort_callback_data = &abort_decode_;

  ctx_ = llama_init_from_model(model, params);
  if (ctx_ == nullptr && (params.type_k != GGML_TYPE_F16 || params.type_v != GGML_TYPE_F16)) {
    // Tell KV types this model cannot hold (a block size that does not divide its head size, K and
    // V types that differ on an MLA model) from a context too large.
    auto plain = params;
    plain.type_k = GGML_TYPE_F16;
    plain.type_v = GGML_TYPE_F16;
    if (llama_context* probe = llama_init_from_model(model, plain)) {
      llama_free(probe);
      throw InvalidEngineOption("kvCacheType",
                                "types this model's KV cache can hold: a block size dividing its head size, and one type for K and V on MLA models",
                                std::string("invalid option kvCacheType: this model cannot hold a KV cache of K ") + ggml_type_name(params.type_k) +
                                    " and V " + ggml_type_name(params.type_v) + " (see the log)");
    }
  }
  if (ctx_ == nullptr && params.kv_paged) {
    // Tell a KV cache paged attention does not cover (sliding-window, DSA/MSA composites) from a context too large.
    auto plain = params;
    plain.kv_paged = false;
    if (llama_context* probe = llama_init_from_model(model, plain)) {
      llama_free(probe);
      throw InvalidEngineOption("kvPaged", "a model whose attention uses one unified KV cache without sliding windows",
                                "invalid option kvPaged: paged attention does not support this model's KV cache (see the log)");
    }
  }
  if (ctx_ == nullptr) {
    throw std::runtime_error("llama.cpp could not create a context (contextSize " + std::to_string(options.context_size) +
                             " x maxSequences " + std::to_string(options.max_sequences) + "); try smaller values");
  }
  ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
  threadpool_ = ggml_threadpool_new(&tpp);
  // Without a pool llama.cpp still works (a pool per compute), so a failure here is not fatal.
  if (threadpool_ != nullptr) llama_attach_threadpool(ctx_, threadpool_, nullptr);
  n_seq_max_ = llama_n_seq_max(ctx_);
  n_ctx_seq_ = std::min<uint32_t>(options.context_size, options.kv_unified ? llama_n_ctx(ctx_) : llama_n_ctx_seq(ctx_));
  n_batch_ = llama_n_batch(ctx_);
  max_queue_ = options.max_queue;
  kv_paged_ = params.kv_paged;
  type_k_ = params.type_k;
  type_v_ = params.type_v;
  moe_group_topk_ = params.moe_group_topk;
  deterministic_ = options.deterministic;
  rpc_endpoints_ = options.rpc_endpoints;
  const bool pooled = options.kv_unified && options.kv_budget > 0;
  if (kv_paged_) block_ = static_cast<uint32_t>(std::max(1, llama_kv_paged_blocks(ctx_, nullptr, nullptr)));
  recurrent_ = recurrent;
  // With one stream per sequence, or in the shared pool (where finished sequences' cells stay as a
  // cache until the room is needed, and copies share cells by reference).
  prompt_cache_ = options.prompt_cache && (!options.kv_unified || pooled) && !options.deterministic;
  // Recurrent state copies for the prompt cache, where the state cannot be cut back (not with
  // drafts: the draft contexts hold their own states).
  if (prompt_cache_ && recurrent && !drafting && options.state_checkpoints > 0) {
    checkpoint_every_ = llama_n_batch(ctx_);
    max_checkpoints_ = options.state_checkpoints;
    checkpoint_memory_ = options.state_checkpoint_memory;
  }
  // A recurrent or hybrid state is not a prefix of KV cells: it is shared through those copies
  // only. The MTP context holds no copy.
  share_prefix_ = prompt_cache_ && (!recurrent || checkpoint_every_ > 0) && !(options.mtp && drafting);
  if (pooled) {
    if (drafting) {
      free_native();
      throw InvalidEngineOption("kvBudget", "no draft model or MTP drafting with a KV budget",
                                "speculative decoding with a shared KV pool (kvBudget) is not supported");
    }
    pool_cells_ = llama_n_ctx(ctx_);
    stats_.kv_pool_tokens = pool_cells_;
    stats_.kv_block_size = block_;
    stats_.kv_pool_blocks = pool_cells_ / block_;
    swap_memory_ = options.kv_swap_memory;
  }
  batch_ = llama_batch_init(static_cast<int32_t>(n_batch_), 0, 1);
  if (drafting) {
    auto undo = [&](const std::string& why) {
      free_native();
      throw std::runtime_error(why);
    };
    if (recurrent && llama_n_rs_seq(ctx_) < options.draft_max) {
      undo("speculative decoding needs to roll the model's recurrent state back over rejected drafts, which llama.cpp "
           "supports only for some architectures (qwen35, qwen35moe, nemotron_h, lfm2, …), not this one");
    }
    // The draft's own context: same sequences, context and batch as the target's, same threads.
    auto draft_params = params;
    const bool draft_recurrent = options.draft_model != nullptr && (llama_model_is_recurrent(options.draft_model) || llama_model_is_hybrid(options.draft_model));
    // A recurrent draft is rolled back over rejected drafts too where llama.cpp can; elsewhere its
    // sequence is fed again from the start (see draft()).
    draft_params.n_rs_seq = !options.mtp && draft_recurrent ? options.draft_max : 0;
    if (options.mtp) {
      draft_params.ctx_type = LLAMA_CONTEXT_TYPE_MTP;
      if (llama_model_n_layer_nextn(model) <= 0) undo("the model has no multi-token-prediction (nextn) layers");
    }
    draft_ctx_ = llama_init_from_model(options.mtp ? model : options.draft_model, draft_params);
    if (draft_ctx_ == nullptr) {
      undo(std::string("llama.cpp could not create a context for ") + (options.mtp ? "the MTP layers" : "the draft model") + " (contextSize " +
           std::to_string(options.context_size) + " x maxSequences " + std::to_string(options.max_sequences) + ")");
    }
    if (threadpool_ != nullptr) llama_attach_threadpool(draft_ctx_, threadpool_, nullptr);
    if (options.mtp) {
      // Every target row's hidden state, in batch order (native/patches/0002), feeds the MTP; its own
      // rows' states chain its drafts.
      mtp_ = true;
      n_embd_ = llama_model_n_embd_out(model);
      llama_set_embeddings_nextn(ctx_, true, false);
      llama_set_embeddings_nextn(draft_ctx_, true, false);
      draft_batch_ = llama_batch_init(static_cast<int32_t>(n_batch_), n_embd_, 1);
      // MTP rows carry both a token and an embedding row; llama_batch_init allocates one of them.
      draft_batch_.token = static_cast<llama_token*>(malloc(sizeof(llama_token) * n_batch_));
    } else {
      draft_batch_ = llama_batch_init(static_cast<int32_t>(n_batch_), 0, 1);
    }
    draft_max_ = options.draft_max;
  }
  if (options.expert_stats) {
    if (llama_expert_stats_enable(ctx_, true) < 0) {
      free_native();
      throw InvalidEngineOption("expertStats", "a mixture-of-experts model (layers with an expert router)",
                                "the model has no routed experts to count (no layer has an expert router)");
    }
    for (int32_t il = 0; il < llama_model_n_layer(model); ++il) {
      const int32_t n = llama_expert_stats_read(ctx_, il, nullptr, 0, false);
      if (n <= 0) continue;
      expert_layers_.push_back(il);
      expert_totals_.emplace_back(static_cast<size_t>(n), 0);
    }
  }
  if (options.gpu_experts > 0) {
    try {
      for (int32_t il = 0; il < llama_model_n_layer(model); ++il) {
        const int32_t n_expert = llama_model_n_expert_layer(model, il);
        if (n_expert <= 0) continue;
        place_layers_.push_back(il);
        place_heat_.emplace_back(static_cast<size_t>(n_expert), 0.0);
      }
      if (place_layers_.empty()) {
        throw InvalidEngineOption("gpuExperts", "a mixture-of-experts model (layers with routed experts)",
                                  "the model has no routed experts to place (no layer has an expert router)");
      }
      if (options.expert_replace_tokens > 0 && !options.expert_stats) {
        throw InvalidEngineOption("expertReplaceTokens", "expertStats: true (the counts it chooses by)",
                                  "expertReplaceTokens re-chooses the copied experts from the engine's expert counts: load with expertStats: true");
      }
      gpu_experts_ = options.gpu_experts;
      replace_every_ = options.expert_replace_tokens;
      check_heat(options.expert_heat);
      add_heat(options.expert_heat);
      place();
    } catch (...) {
      free_native();
      throw;
    }
  }
  slots_.resize(n_seq_max_);
  for (uint32_t i = 0; i < n_seq_max_; ++i) slots_[i].seq = static_cast<llama_seq_id>(i);
  thread_ = std::thread(&Engine::loop, this);
}

Engine::~Engine() {
  stop();
  join();
  free_native();
}

void Engine::free_native() {
  if (draft_ctx_ != nullptr) {
    llama_batch_free(draft_batch_);
    llama_free(draft_ctx_);
    draft_ctx_ = nullptr;
  }
  draft_batch_ = {};
  if (ctx_ != nullptr) llama_free(ctx_);
  ctx_ = nullptr;
  if (threadpool_ != nullptr) ggml_threadpool_free(threadpool_);
  threadpool_ = nullptr;
  llama_batch_free(batch_);  // frees only what was allocated (a zeroed batch holds nothing)
  batch_ = {};
}

uint32_t Engine::total_context() const { return llama_n_ctx(ctx_); }

void Engine::submit(Request request) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) throw std::runtime_error("DISPOSED");
    if (max_queue_ > 0 && stats_.queued >= max_queue_) throw QueueFull(stats_.queued);
    incoming_.push_back(Pending{std::move(request), next_order_++, Clock::now(), nullptr});
    stats_.queued++;
  }
  cv_.notify_one();
}

void Engine::feed(uint64_t id, llama_token token) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    feeds_.emplace_back(id, token);
  }
  cv_.notify_one();
}

void Engine::apply_feeds(const std::vector<std::pair<uint64_t, llama_token>>& feeds) {
  for (const auto& [id, token] : feeds) {
    for (auto& slot : slots_) {
      // A request cancelled or failed meanwhile is no longer there: its token is dropped.
      if (!slot.busy || !slot.awaiting || slot.request.id != id) continue;
      slot.awaiting = false;
      accept(slot, token);
      break;
    }
  }
}

void Engine::cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancels_.insert(id);
  }
  cv_.notify_one();
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  abort_decode_ = true;
  cv_.notify_one();
}

void Engine::join() {
  if (thread_.joinable()) thread_.join();
}

std::vector<Event> Engine::drain() {
  std::lock_guard<std::mutex> lock(mu_);
  notified_ = false;
  std::vector<Event> events;
  events.swap(outbox_);
  return events;
}

EngineStats Engine::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  EngineStats s = stats_;
  s.kv_swap_bytes = swap_bytes_.load();
  return s;
}

std::vector<ExpertLayerCounts> Engine::expert_counts(bool reset) {
  if (expert_layers_.empty()) throw std::logic_error("expert statistics are off for this model");
  std::vector<ExpertLayerCounts> snapshot(expert_layers_.size());
  between_steps([&] {
    fold_expert_counts();
    for (size_t i = 0; i < expert_layers_.size(); ++i) {
      snapshot[i].layer = expert_layers_[i];
      snapshot[i].counts = expert_totals_[i];
      if (reset) std::fill(expert_totals_[i].begin(), expert_totals_[i].end(), 0);
    }
  });
  return snapshot;
}

void Engine::fold_expert_counts() {
  for (size_t i = 0; i < expert_layers_.size(); ++i) {
    auto& totals = expert_totals_[i];
    expert_scratch_.resize(totals.size());
    const int32_t n = llama_expert_stats_read(ctx_, expert_layers_[i], expert_scratch_.data(), static_cast<int32_t>(totals.size()), true);
    if (n != static_cast<int32_t>(totals.size())) continue;
    for (size_t e = 0; e < totals.size(); ++e) totals[e] += static_cast<uint64_t>(expert_scratch_[e]);
    // Expert placement: the layer's heat, and how much of its traffic the copies took.
    const auto placed = std::find(place_layers_.begin(), place_layers_.end(), expert_layers_[i]);
    const size_t p = static_cast<size_t>(placed - place_layers_.begin());
    if (placed == place_layers_.end() || p >= placement_.size()) continue;
    auto& heat = place_heat_[p];
    std::lock_guard<std::mutex> lock(mu_);
    ExpertPlacement& where = placement_[p];
    for (size_t e = 0; e < totals.size() && e < heat.size(); ++e) {
      heat[e] += expert_scratch_[e];
      where.routed += static_cast<uint64_t>(expert_scratch_[e]);
    }
    for (int32_t e : where.experts) where.routed_to_copies += static_cast<uint64_t>(expert_scratch_[static_cast<size_t>(e)]);
  }
  expert_unfolded_tokens_ = 0;
}

void Engine::check_heat(const std::vector<ExpertLayerCounts>& heat) const {
  for (const auto& layer : heat) {
    const int32_t n_expert = llama_model_n_expert_layer(model_, layer.layer);
    if (n_expert <= 0 || layer.counts.size() != static_cast<size_t>(n_expert)) {
      throw InvalidEngineOption("expertHeat", "expert counts of this model's MoE layers (as expertStats() returns them)",
                                "expertHeat names layer " + std::to_string(layer.layer) + " with " + std::to_string(layer.counts.size()) +
                                    " experts; that layer has " + std::to_string(n_expert) + " routed experts");
    }
  }
}

void Engine::add_heat(const std::vector<ExpertLayerCounts>& heat) {
  for (const auto& layer : heat) {
    const auto placed = std::find(place_layers_.begin(), place_layers_.end(), layer.layer);
    if (placed == place_layers_.end()) continue;  // its experts are on the device already
    auto& h = place_heat_[static_cast<size_t>(placed - place_layers_.begin())];
    for (size_t e = 0; e < h.size(); ++e) h[e] += static_cast<double>(layer.counts[e]);
  }
}

void Engine::place() {
  std::vector<ExpertPlacement> chosen;
  for (size_t i = 0; i < place_layers_.size();) {
    const int32_t il = place_layers_[i];
    auto& heat = place_heat_[i];
    std::vector<int32_t> order(heat.size());
    for (size_t e = 0; e < order.size(); ++e) order[e] = static_cast<int32_t>(e);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return heat[static_cast<size_t>(a)] > heat[static_cast<size_t>(b)]; });
    order.resize(std::min<size_t>(gpu_experts_, order.size()));
    const int64_t bytes = llama_moe_place(ctx_, il, order.data(), static_cast<int32_t>(order.size()));
    if (bytes == -3) {
      // Experts on the device already (not kept in host memory), or a layout the CPU cannot skip
      // experts of: the layer runs as loaded.
      place_layers_.erase(place_layers_.begin() + static_cast<std::ptrdiff_t>(i));
      place_heat_.erase(place_heat_.begin() + static_cast<std::ptrdiff_t>(i));
      continue;
    }
    if (bytes < 0) {
      throw std::runtime_error("llama.cpp could not copy " + std::to_string(order.size()) + " experts of layer " + std::to_string(il) +
                               " to its device (" + (bytes == -4 ? "out of device memory" : "error " + std::to_string(bytes)) + ")");
    }
    for (double& h : heat) h /= 2;  // recent traffic weighs most at the next choice
    ExpertPlacement where;
    where.layer = il;
    where.experts = std::move(order);
    where.bytes = static_cast<uint64_t>(bytes);
    chosen.push_back(std::move(where));
    ++i;
  }
  if (place_layers_.empty()) {
    throw InvalidEngineOption("gpuExperts", "a model whose MoE layers keep their experts in host memory (cpuMoeLayers)",
                              "gpuExperts copies experts kept in host memory to their layer's device, and no layer keeps them there in "
                              "a form it can split (plain host buffers, no expert biases or scales): load with cpuMoeLayers");
  }
  std::lock_guard<std::mutex> lock(mu_);
  placement_ = std::move(chosen);
  replace_tokens_ = 0;
}

std::vector<ExpertPlacement> Engine::expert_placement() {
  if (!expert_layers_.empty()) between_steps([this] { fold_expert_counts(); });  // routed counts up to now
  std::lock_guard<std::mutex> lock(mu_);
  return placement_;
}

std::string Engine::expert_placement_error() {
  std::lock_guard<std::mutex> lock(mu_);
  return place_error_;
}

std::vector<ExpertPlacement> Engine::place_experts(const std::vector<ExpertLayerCounts>& heat) {
  if (place_layers_.empty()) throw std::logic_error("expert placement is off for this model");
  check_heat(heat);
  between_steps([&] {
    if (!expert_layers_.empty()) fold_expert_counts();
    add_heat(heat);
    place();
  });
  return expert_placement();
}

void Engine::between_steps(std::function<void()> task) {
  std::packaged_task<void()> job(std::move(task));
  std::future<void> done = job.get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) throw std::runtime_error("the model was disposed");
    tasks_.push_back(std::move(job));
  }
  cv_.notify_one();
  try {
    done.get();
  } catch (const std::future_error&) {
    throw std::runtime_error("the model was disposed");  // the engine stopped before running it
  }
}

void Engine::run_tasks() {
  std::vector<std::packaged_task<void()>> tasks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks.swap(tasks_);
  }
  for (auto& task : tasks) task();  // exceptions go to the waiting caller
}

void Engine::push(Event event) {
  std::lock_guard<std::mutex> lock(mu_);
  outbox_.push_back(std::move(event));
}

void Engine::flush_events() {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake = !outbox_.empty() && !notified_;
    if (wake) notified_ = true;
  }
  // Coalescing: the owner is woken once and drains everything that piled up meanwhile.
  if (wake && notify_) notify_();
}

void Engine::loop() {
  while (true) {
    std::unordered_set<uint64_t> cancels;
    std::vector<std::pair<uint64_t, llama_token>> feeds;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Slots waiting for an external token have nothing to decode until it is fed.
      const bool busy = !waiting_.empty() || std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.busy && !s.awaiting; });
      cv_.wait(lock, [&] {
        return stop_ || !incoming_.empty() || !cancels_.empty() || !feeds_.empty() || busy || !tasks_.empty();
      });
      if (stop_) break;
      for (auto& p : incoming_) waiting_.push_back(std::move(p));
      incoming_.clear();
      cancels.swap(cancels_);
      feeds.swap(feeds_);
    }
    if (!cancels.empty()) apply_cancels(cancels);
    if (!feeds.empty()) apply_feeds(feeds);
    run_tasks();
    if (!broken_.empty()) {
      // A lost RPC server took part of the model's weights with it: nothing can run any more.
      fail_waiting("RPC_DISCONNECTED", broken_);
      flush_events();
      continue;
    }
    const auto started = std::chrono::steady_clock::now();
    admit();
    step();
    const uint64_t took = elapsed_ns(started);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.step_ns += took;
    }
    flush_events();
  }

  {
    // between_steps() callers (expert reads, placement) learn that the engine stopped.
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.clear();
  }

  // Disposal: nothing in flight is dropped silently; every request learns why it ended.
  for (auto& slot : slots_) {
    if (slot.busy) fail(slot, "DISPOSED", "the model was disposed during generation");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& p : incoming_) waiting_.push_back(std::move(p));
    incoming_.clear();
  }
  fail_waiting("DISPOSED", "the model was disposed before the request started");
  flush_events();
}

void Engine::fail_waiting(const std::string& code, const std::string& message) {
  for (auto& p : waiting_) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.queued--;
    }
    Event e;
    e.id = p.request.id;
    e.kind = Event::Kind::Error;
    e.error_code = code;
    e.error_message = message;
    push(std::move(e));
  }
  waiting_.clear();
}

void Engine::apply_cancels(const std::unordered_set<uint64_t>& ids) {
  for (auto& slot : slots_) {
    if (slot.busy && ids.count(slot.request.id)) finish(slot, "abort");
  }
  auto it = std::remove_if(waiting_.begin(), waiting_.end(), [&](Pending& p) {
    if (!ids.count(p.request.id)) return false;
    Event e;
    e.id = p.request.id;
    e.kind = Event::Kind::Done;
    e.finish_reason = "abort";
    e.prompt_tokens = static_cast<int32_t>(p.request.prompt.size());
    e.timings.queued_ms = ms_between(p.submitted, Clock::now());
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.queued--;
    }
    push(std::move(e));
    return true;
  });
  waiting_.erase(it, waiting_.end());
}

void Engine::admit() {
  // Highest priority first, then arrival order; a request whose prompt prefix another sequence is
  // computing right now waits for it (deferred) while later ones go ahead.
  std::vector<size_t> order(waiting_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (waiting_[a].request.priority != waiting_[b].request.priority) return waiting_[a].request.priority > waiting_[b].request.priority;
    return waiting_[a].order < waiting_[b].order;
  });
  std::vector<size_t> admitted;
  // Shared KV pool: cells the running sequences will fill with the rest of their prompts.
  uint64_t committed = 0;
  if (pool_cells_ > 0) {
    for (const auto& s : slots_) {
      if (s.busy) committed += cells_for(s, s.request.prompt.size() - std::min(s.prefilled, s.request.prompt.size()));
    }
  }
  for (size_t w : order) {
    const auto& prompt = waiting_[w].request.prompt;
    // A preempted request whose KV was copied to host memory: that many tokens can go back as they were.
    const Resume* resume = waiting_[w].resume.get();
    const size_t swapped = resume != nullptr && !resume->swapped.empty() ? resume->swapped_tokens : 0;
    // The free slot whose cached tokens share the longest prefix with this prompt; among equals the
    // least recently used (an unused slot first), so a cache another prompt may want survives longest.
    Slot* chosen = nullptr;
    size_t chosen_lcp = 0;
    for (auto& slot : slots_) {
      if (slot.busy) continue;
      const size_t lcp = prompt_cache_ ? reusable(slot, common_prefix(slot.kv_tokens, prompt)) : 0;
      if (chosen == nullptr || lcp > chosen_lcp || (lcp == chosen_lcp && slot.released_at < chosen->released_at)) {
        chosen = &slot;
        chosen_lcp = lcp;
      }
    }
    if (chosen == nullptr) break;
    // Another sequence's stream may hold more of this prompt (a shared system prompt, another turn of
    // the same chat): its KV is copied rather than computed again. One still computing a longer
    // shared prefix is waited for.
    Slot* donor = nullptr;
    size_t donor_lcp = 0;
    if (share_prefix_) {
      size_t pending = 0;
      for (auto& other : slots_) {
        if (&other == chosen) continue;
        size_t held = reusable(other, common_prefix(other.kv_tokens, prompt));
        held -= held % block_;  // in whole blocks: the copy's next token goes to a new block
        if (held > donor_lcp) {
          donor = &other;
          donor_lcp = held;
        }
        if (other.busy && other.prefilled < other.request.prompt.size()) {
          size_t coming = common_prefix(other.request.prompt, prompt);
          if (checkpoint_every_ > 0) coming -= coming % checkpoint_every_;  // where its state copies will be
          coming -= coming % block_;  // what a copy of it may take: whole blocks
          pending = std::max(pending, coming);
        }
      }
      if (swapped == 0 && pending >= kSharedPrefixMin && pending > std::max(chosen_lcp, donor_lcp) + kSharedPrefixMin) continue;  // deferred
      if (donor_lcp < chosen_lcp + kSharedPrefixMin) donor = nullptr;
    }
    // The host copy, unless the cache or another sequence holds at least as much of the prompt.
    const bool swap_in = swapped > std::max(chosen_lcp, donor != nullptr ? donor_lcp : 0);
    if (swap_in) donor = nullptr;
    if (pool_cells_ > 0) {
      // A request starts when the rest of its prompt and its first token fit in the pool beside
      // what is held (a resumed prompt may fill a sequence's whole context, at most the pool);
      // finished sequences' cached cells make room first. The queue keeps its order: a long prompt
      // is not overtaken for ever by short ones.
      // (A recurrent state may not be cut back to the shared prefix: counted as computed again.)
      // (A host copy goes back into new cells: nothing of it is reused.)
      const size_t reused = recurrent_ || swap_in ? 0 : std::min(std::max(chosen_lcp, donor != nullptr ? donor_lcp : 0), prompt.size() - 1);
      // (A copied or restored sequence starts in new blocks; the chosen slot's own cache continues.)
      const bool fresh = donor != nullptr || swap_in;
      // The chosen slot's own cache beyond what this prompt reuses goes now (start() would drop it).
      if (!chosen->busy) trim_kv(*chosen, fresh ? 0 : std::min(chosen_lcp, prompt.size() - 1));
      const uint64_t rest = prompt.size() - reused;
      const uint64_t need = std::min<uint64_t>(cells_for(*chosen, rest + 1, fresh), pool_cells_);
      bool fits = pool_used() + committed + need <= pool_cells_;
      while (!fits && evict_cached(chosen, donor)) fits = pool_used() + committed + need <= pool_cells_;
      if (!fits) break;
      // What the copy puts back is held from the start; the rest of the prompt is still to come.
      const uint64_t restored = swap_in ? std::min<uint64_t>(swapped, rest) : 0;
      committed += std::min<uint64_t>(cells_for(*chosen, rest - restored, fresh), pool_cells_ - 1);
    }
    admitted.push_back(w);
    start(*chosen, std::move(waiting_[w]), chosen_lcp, donor, donor_lcp, swap_in);
  }
  // Erase the admitted from the back, so the indices stay valid.
  std::sort(admitted.begin(), admitted.end());
  for (auto it = admitted.rbegin(); it != admitted.rend(); ++it) waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(*it));
}

void Engine::start(Slot& slot, Pending p, size_t cached, Slot* donor, size_t donor_tokens, bool swap_in) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.queued--;
    stats_.active++;
  }
  slot.busy = true;
  slot.request = std::move(p.request);
  slot.order = p.order;
  slot.prompt_tokens = slot.request.prompt.size();
  slot.preemptions = p.resume ? p.resume->preemptions : 0;
  if (p.resume) {
    // A preempted request: its prompt now ends with the tokens it generated; its sampler (with the
    // penalties' history) and text state continue where they were.
    Resume& r = *p.resume;
    slot.sampler = std::move(r.sampler);
    slot.text = std::move(r.text);
    slot.prompt_tokens = r.prompt_tokens;
  } else {
    slot.sampler = make_sampler_chain(vocab_, slot.request.sampling);
  }
  if (!slot.sampler) {
    // Grammars are parsed at submit already; this only guards against a mismatch.
    fail(slot, "INVALID_OPTION", "invalid option grammar: llama.cpp could not parse it");
    return;
  }
  if (!p.resume && uses_penalties(slot.request.sampling)) {
    // Penalties look at the prompt too, as in Hugging Face's generate.
    for (llama_token t : slot.request.prompt) llama_sampler_accept(slot.sampler.get(), t);
  }
  if (!p.resume) slot.text = TextStream(slot.request.stop);
  llama_memory_t mem = llama_get_memory(ctx_);
  size_t lcp = cached;
  if (swap_in) {
    // A preempted sequence's KV back from host memory into free cells, bit for bit as it was
    // computed. Should llama.cpp refuse (no room after all), it is recomputed.
    Resume& r = *p.resume;
    drop_kv(slot);
    const size_t n = r.swapped.size();
    if (llama_state_seq_set_data(ctx_, r.swapped.data(), n, slot.seq) == n) {
      const auto& prompt = slot.request.prompt;
      slot.kv_tokens.assign(prompt.begin(), prompt.begin() + static_cast<std::ptrdiff_t>(r.swapped_tokens));
      slot.segments.push_back({next_origin_++, 0});
      lcp = r.swapped_tokens;
      std::lock_guard<std::mutex> lock(mu_);
      stats_.kv_swap_ins++;
    } else {
      drop_kv(slot);
      lcp = 0;
    }
    slot.mtp_tokens.clear();
    slot.mtp_h.clear();
  } else if (donor != nullptr) {
    // The whole donor sequence is copied, then cut to the shared prefix: with one stream per
    // sequence llama.cpp copies the stream's data whole, at the next decode; in the shared pool the
    // cells are shared by reference. The donor's cells below the prefix do not change meanwhile: a
    // sequence only appends.
    drop_kv(slot);
    llama_memory_seq_cp(mem, donor->seq, slot.seq, -1, -1);
    slot.kv_tokens.assign(donor->kv_tokens.begin(), donor->kv_tokens.begin() + static_cast<std::ptrdiff_t>(donor_tokens));
    slot.segments = donor->segments;
    if (checkpoint_every_ > 0) {
      // The copied state is the donor's latest; the copy of it at donor_tokens is what trim_kv
      // below goes back to (unless the donor's state ends right there).
      for (auto& c : donor->checkpoints) {
        if (c.tokens != donor_tokens) continue;
        c.used = ++checkpoint_clock_;
        add_checkpoint(slot, Slot::StateCheckpoint{c.tokens, c.data});
        break;
      }
    }
    slot.mtp_tokens.clear();
    slot.mtp_h.clear();
    lcp = donor_tokens;
    std::lock_guard<std::mutex> lock(mu_);
    stats_.shared_prefix_copies++;
  }
  if (p.resume) p.resume->drop_swap();  // used or not, the copy is not needed again
  // Reuse the cached prefix, leaving at least the last prompt token to decode for its logits.
  trim_kv(slot, slot.request.prompt.empty() ? 0 : std::min(lcp, slot.request.prompt.size() - 1));
  const size_t keep = slot.kv_tokens.size();  // 0 when a recurrent state could not be cut back
  // The kept cells keep their origins; what this request computes is a new one.
  slot.segments.push_back({next_origin_++, keep});
  // MTP rows still queued from the slot's previous request are good for the reused prefix only.
  if (slot.mtp_pos + static_cast<llama_pos>(slot.mtp_tokens.size()) > static_cast<llama_pos>(keep)) {
    const size_t rows = static_cast<size_t>(std::max<llama_pos>(0, static_cast<llama_pos>(keep) - slot.mtp_pos));
    slot.mtp_tokens.resize(rows);
    slot.mtp_h.resize(rows * static_cast<size_t>(n_embd_));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.prompt_tokens += slot.request.prompt.size();
    stats_.cached_prompt_tokens += keep;
  }
  slot.prefilled = keep;
  slot.n_past = static_cast<llama_pos>(keep);
  slot.generated = 0;
  slot.batch_index = -1;
  slot.unsent.clear();
  slot.admitted_order = next_admit_++;
  slot.submitted = p.submitted;
  slot.admitted = Clock::now();
  slot.has_first_token = false;
  if (p.resume) {
    slot.generated = p.resume->generated;
    slot.admitted = p.resume->admitted;
    slot.first_token = p.resume->first_token;
    slot.has_first_token = p.resume->has_first_token;
  }
}

uint64_t Engine::tail_room(const Slot& slot) const {
  return static_cast<uint64_t>(std::max(0, llama_kv_paged_seq_room(ctx_, slot.seq)));
}

uint64_t Engine::cells_for(const Slot& slot, uint64_t n, bool fresh) const {
  if (block_ == 1) return n;
  const uint64_t room = fresh ? 0 : tail_room(slot);
  const uint64_t beyond = n > room ? n - room : 0;
  return (beyond + block_ - 1) / block_ * block_;
}

uint64_t Engine::tokens_within(const Slot& slot, uint64_t cells) const {
  if (block_ == 1) return cells;
  return tail_room(slot) + cells / block_ * block_;
}

uint64_t Engine::pool_used() const {
  if (block_ > 1) {
    // Blocks are where the cells lie, which only llama.cpp knows: a partly filled block is held whole.
    uint32_t used = 0;
    llama_kv_paged_blocks(ctx_, &used, nullptr);
    return static_cast<uint64_t>(used) * block_;
  }
  // Per origin, its cells run from its start to the furthest any holder kept.
  std::unordered_map<uint64_t, std::pair<size_t, size_t>> spans;
  for (const auto& s : slots_) {
    const size_t held = s.kv_tokens.size();
    for (size_t i = 0; i < s.segments.size(); ++i) {
      const size_t start = s.segments[i].start;
      const size_t end = std::min(held, i + 1 < s.segments.size() ? s.segments[i + 1].start : held);
      if (end <= start) continue;
      auto [it, fresh] = spans.try_emplace(s.segments[i].origin, start, end);
      if (!fresh) it->second.second = std::max(it->second.second, end);
    }
  }
  uint64_t used = 0;
  for (const auto& [origin, span] : spans) used += span.second - span.first;
  return used;
}

void Engine::drop_kv(Slot& s) {
  llama_memory_seq_rm(llama_get_memory(ctx_), s.seq, -1, -1);
  s.kv_tokens.clear();
  s.segments.clear();
  drop_checkpoints(s, 0);
}

void Engine::trim_kv(Slot& s, size_t keep) {
  // Also when kv_tokens is no longer than keep: cells a copy or a failed decode left are dropped.
  llama_memory_t mem = llama_get_memory(ctx_);
  if (!llama_memory_seq_rm(mem, s.seq, static_cast<llama_pos>(keep), -1)) {
    // A recurrent state cannot be cut back to a position: back to a copy of it at or below keep
    // (the state then ends there, so the cut is allowed), else start afresh.
    keep = restore_checkpoint(s, keep);
    if (keep == kNoCheckpoint || !llama_memory_seq_rm(mem, s.seq, static_cast<llama_pos>(keep), -1)) {
      drop_kv(s);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_.state_checkpoint_restores++;
  }
  if (s.kv_tokens.size() > keep) s.kv_tokens.resize(keep);
  while (!s.segments.empty() && s.segments.back().start >= keep) s.segments.pop_back();
  drop_checkpoints(s, keep);
}

void Engine::save_checkpoint(Slot& s) {
  const size_t tokens = s.kv_tokens.size();
  if (!s.checkpoints.empty() && s.checkpoints.back().tokens >= tokens) return;
  const size_t size = llama_state_seq_get_size_ext(ctx_, s.seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY);
  if (size == 0) return;
  Slot::StateCheckpoint c{tokens, std::vector<uint8_t>(size)};
  if (llama_state_seq_get_data_ext(ctx_, c.data.data(), size, s.seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) != size) return;
  add_checkpoint(s, std::move(c));
}

size_t Engine::reusable(const Slot& s, size_t shared) const {
  if (checkpoint_every_ == 0 || shared == 0) return shared;
  // A state that ends right at the shared prefix (an idle sequence's whole cache), else the newest
  // copy at or below it.
  if (!s.busy && shared == s.kv_tokens.size()) return shared;
  size_t best = 0;
  for (const auto& c : s.checkpoints) {
    if (c.tokens <= shared) best = c.tokens;
  }
  return best;
}

void Engine::add_checkpoint(Slot& s, Slot::StateCheckpoint c) {
  const uint64_t size = c.data.size();
  uint64_t freed = 0;
  c.used = ++checkpoint_clock_;
  s.checkpoints.push_back(std::move(c));
  if (s.checkpoints.size() > max_checkpoints_) {
    // Keep them spread out: drop the one (not the oldest, not the newest) closest to the one before.
    size_t drop = 1;
    for (size_t i = 2; i + 1 < s.checkpoints.size(); ++i) {
      if (s.checkpoints[i].tokens - s.checkpoints[i - 1].tokens < s.checkpoints[drop].tokens - s.checkpoints[drop - 1].tokens) drop = i;
    }
    if (s.checkpoints.size() == 2) drop = 0;  // max_checkpoints_ 1: only the newest
    freed = s.checkpoints[drop].data.size();
    s.checkpoints.erase(s.checkpoints.begin() + static_cast<std::ptrdiff_t>(drop));
  }
  count_checkpoint_bytes(size, freed);
  // Over the memory limit: the least recently taken or used copies go, each sequence's newest last;
  // the copy just taken stays.
  while (checkpoint_memory_ > 0 && checkpoint_bytes_ > checkpoint_memory_) {
    Slot* owner = nullptr;
    size_t index = 0;
    std::pair<bool, uint64_t> oldest{};  // (a sequence's newest, when taken or used)
    for (auto& slot : slots_) {
      for (size_t i = 0; i < slot.checkpoints.size(); ++i) {
        const bool newest = i + 1 == slot.checkpoints.size();
        if (newest && &slot == &s) continue;
        const std::pair<bool, uint64_t> key{newest, slot.checkpoints[i].used};
        if (owner == nullptr || key < oldest) {
          owner = &slot;
          index = i;
          oldest = key;
        }
      }
    }
    if (owner == nullptr) break;  // only the copy just taken is left
    const uint64_t bytes = owner->checkpoints[index].data.size();
    owner->checkpoints.erase(owner->checkpoints.begin() + static_cast<std::ptrdiff_t>(index));
    count_checkpoint_bytes(0, bytes);
  }
}

void Engine::count_checkpoint_bytes(uint64_t added, uint64_t freed) {
  checkpoint_bytes_ = checkpoint_bytes_ + added - freed;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.state_checkpoint_bytes = checkpoint_bytes_;
}

size_t Engine::restore_checkpoint(Slot& s, size_t keep) {
  keep = std::min(keep, s.kv_tokens.size());
  auto it = std::find_if(s.checkpoints.rbegin(), s.checkpoints.rend(), [&](const Slot::StateCheckpoint& c) { return c.tokens <= keep; });
  if (it == s.checkpoints.rend()) return kNoCheckpoint;
  it->used = ++checkpoint_clock_;
  // The copy replaces the recurrent part of the state only; the attention cells stay.
  const size_t n = it->data.size();
  return llama_state_seq_set_data_ext(ctx_, it->data.data(), n, s.seq, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == n ? it->tokens : kNoCheckpoint;
}

void Engine::drop_checkpoints(Slot& s, size_t keep) {
  uint64_t freed = 0;
  while (!s.checkpoints.empty() && s.checkpoints.back().tokens > keep) {
    freed += s.checkpoints.back().data.size();
    s.checkpoints.pop_back();
  }
  if (freed > 0) count_checkpoint_bytes(0, freed);
}

bool Engine::evict_cached(const Slot* keep_a, const Slot* keep_b) {
  Slot* lru = nullptr;
  for (auto& s : slots_) {
    if (s.busy || s.kv_tokens.empty() || &s == keep_a || &s == keep_b) continue;
    if (lru == nullptr || s.released_at < lru->released_at) lru = &s;
  }
  if (lru == nullptr) return false;
  drop_kv(*lru);
  return true;
}

bool Engine::preempt_one() {
  // The lowest priority; among equals the latest admitted (it has the least work to redo).
  Slot* victim = nullptr;
  for (auto& s : slots_) {
    if (!s.busy || s.awaiting) continue;
    if (victim == nullptr || s.request.priority < victim->request.priority ||
        (s.request.priority == victim->request.priority && s.admitted_order > victim->admitted_order)) {
      victim = &s;
    }
  }
  if (victim == nullptr) return false;
  Slot& s = *victim;
  auto resume = std::make_shared<Resume>();
  resume->prompt_tokens = s.prompt_tokens;
  resume->generated = s.generated;
  resume->preemptions = s.preemptions + 1;
  resume->sampler = std::move(s.sampler);
  resume->text = std::move(s.text);
  resume->admitted = s.admitted;
  resume->first_token = s.first_token;
  resume->has_first_token = s.has_first_token;
  Pending p;
  p.order = s.order;
  p.submitted = s.submitted;
  p.request = std::move(s.request);
  if (s.prefilled >= p.request.prompt.size() && s.generated > 0) {
    // Generating: what its KV held, and the sampled token still to decode. Recomputing them ends
    // with the logits that decoding that token would have given.
    p.request.prompt = s.kv_tokens;
    p.request.prompt.push_back(s.last);
  }
  if (swap_memory_ > 0 && !s.kv_tokens.empty()) swap_out(s, *resume);
  p.resume = std::move(resume);
  s.request = Request();  // release() must not see the moved-from request
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.preemptions++;
    stats_.queued++;
  }
  s.unsent.clear();
  release(s);
  drop_kv(s);
  s.text = TextStream({});
  waiting_.push_back(std::move(p));
  return true;
}

void Engine::swap_out(const Slot& s, Resume& r) {
  // Its whole KV (shared cells too: they come back as its own) and any recurrent state.
  const size_t size = llama_state_seq_get_size(ctx_, s.seq);
  if (size == 0 || swap_bytes_.load() + size > swap_memory_) return;
  std::vector<uint8_t> data;
  try {
    data.resize(size);
  } catch (const std::bad_alloc&) {
    return;  // the host is short of memory after all: recomputed instead
  }
  if (llama_state_seq_get_data(ctx_, data.data(), size, s.seq) != size) return;
  r.swapped = std::move(data);
  r.swapped_tokens = s.kv_tokens.size();
  r.swap_bytes = &swap_bytes_;
  swap_bytes_ += size;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.kv_swap_outs++;
}

void Engine::step() {
  // Budget: every generating sequence gets its one token first, then prompt chunks, oldest first.
  // Deterministic mode decodes each sequence on its own, so each gets the whole budget: its
  // decode calls are then exactly those of a solo run, whatever else is in flight.
  std::vector<uint32_t> take(slots_.size(), 0);
  uint32_t budget = n_batch_;
  // Shared KV pool: every generating sequence needs a cell for its token this step. When they do
  // not all fit, the lowest-priority, latest admitted sequence goes back to the queue, until they
  // do; prompt chunks then take what is left.
  uint64_t room = UINT64_MAX;
  if (pool_cells_ > 0) {
    while (true) {
      const uint64_t used = pool_used();
      const uint64_t free_cells = pool_cells_ > used ? pool_cells_ - used : 0;
      uint64_t generating = 0;  // cells the generating tokens take (in blocks: those starting one)
      bool any_generating = false, prefilling_any = false, prefill_moves = false;
      for (const auto& s : slots_) {
        if (!s.busy || s.awaiting) continue;
        if (s.prefilled >= s.request.prompt.size()) {
          generating += cells_for(s, 1);
          any_generating = true;
        } else {
          prefilling_any = true;
          prefill_moves = prefill_moves || tokens_within(s, free_cells) > 0;
        }
      }
      // Nothing could move (no cell for any generating token, or none for a prompt chunk when only
      // prompts are left): make room.
      const bool stuck = generating > free_cells || (!any_generating && prefilling_any && !prefill_moves);
      room = free_cells > generating ? free_cells - generating : 0;
      // Finished sequences' cached cells go first, least recently used first.
      if (!stuck || (!evict_cached(nullptr, nullptr) && !preempt_one())) break;
    }
  }
  std::vector<Slot*> prefilling;
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    if (!s.busy || s.awaiting) continue;
    if (s.prefilled < s.request.prompt.size()) {
      prefilling.push_back(&s);
    } else if (deterministic_ || budget > 0) {
      take[i] = 1;
      if (!deterministic_) budget--;
    }
  }
  // Speculative decoding: generating sequences get their drafts next, within what is left of the
  // budget, their context and their max_tokens.
  std::vector<size_t> speculating;
  std::vector<uint32_t> draft_k(slots_.size(), 0);
  if (draft_ctx_ != nullptr) {
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (take[i] != 1 || s.prefilled < s.request.prompt.size() || s.request.external_sampling) continue;
      const int32_t max_k = draft_limit(s);
      if (max_k <= 0) continue;
      if (s.draft_k < 0) s.draft_k = max_k;
      if (s.draft_k == 0 && ++s.draft_pause >= 16) {
        s.draft_k = 1;  // drafts were all rejected for a while: try one again
        s.draft_pause = 0;
      }
      int64_t k = std::min<int64_t>(s.draft_k, max_k);
      k = std::min<int64_t>(k, static_cast<int64_t>(n_ctx_seq_) - s.n_past - 2);
      if (s.request.max_tokens >= 0) k = std::min<int64_t>(k, s.request.max_tokens - s.generated - 1);
      k = std::min<int64_t>(k, budget);
      if (k <= 0) continue;
      draft_k[i] = static_cast<uint32_t>(k);
      budget -= static_cast<uint32_t>(k);
      speculating.push_back(i);
    }
    if (mtp_) {
      mtp_draft(speculating, draft_k);  // also brings the MTP context up to date when none drafts
    } else if (!speculating.empty()) {
      draft(speculating, draft_k);
    }
    for (size_t i : speculating) take[i] = 1 + static_cast<uint32_t>(slots_[i].drafts.size());
  }
  std::sort(prefilling.begin(), prefilling.end(), [](const Slot* a, const Slot* b) { return a->admitted_order < b->admitted_order; });
  for (Slot* s : prefilling) {
    if (!deterministic_ && budget == 0) break;
    uint32_t n = static_cast<uint32_t>(std::min<size_t>(deterministic_ ? n_batch_ : budget, s->request.prompt.size() - s->prefilled));
    if (checkpoint_every_ > 0) {
      // A chunk ends at the next multiple of the batch size, where the state is copied (as a solo
      // prefill's chunks do anyway).
      const size_t next = (s->prefilled / checkpoint_every_ + 1) * checkpoint_every_;
      if (next < s->request.prompt.size()) n = static_cast<uint32_t>(std::min<size_t>(n, next - s->prefilled));
    }
    if (room != UINT64_MAX) {
      n = static_cast<uint32_t>(std::min<uint64_t>(n, tokens_within(*s, room)));
      room -= cells_for(*s, n);
    }
    if (n == 0) continue;
    take[static_cast<size_t>(s->seq)] = n;
    if (!deterministic_) budget -= n;
  }

  std::vector<size_t> chosen;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (take[i] > 0) chosen.push_back(i);
  }
  if (deterministic_) {
    for (size_t i : chosen) decode({i}, take);
  } else if (!chosen.empty()) {
    decode(chosen, take);
  }
  uint64_t kv_used = 0;
  for (const auto& s : slots_) {
    if (s.busy) kv_used += static_cast<uint64_t>(s.n_past);
  }
  const uint64_t pool_held = pool_cells_ > 0 ? pool_used() : 0;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.kv_used_tokens = kv_used;
  stats_.kv_pool_used_tokens = pool_held;
  stats_.kv_pool_used_blocks = pool_held / block_;
}

void Engine::decode(const std::vector<size_t>& which, const std::vector<uint32_t>& take) {
  // Tokens are laid out by increasing sequence id: with one KV stream per sequence, llama.cpp
  // batches consecutive sequence ids together in one micro-batch.
  batch_.n_tokens = 0;
  auto add = [&](llama_token token, llama_pos pos, llama_seq_id seq, bool logits) { return batch_add(batch_, token, pos, seq, logits); };
  std::vector<llama_pos> past_before(slots_.size(), 0);
  for (size_t i : which) {
    Slot& s = slots_[i];
    s.batch_begin = batch_.n_tokens;
    past_before[i] = s.n_past;
    if (s.prefilled < s.request.prompt.size()) {
      for (uint32_t k = 0; k < take[i]; ++k) {
        const bool last = s.prefilled + 1 == s.request.prompt.size();
        const int32_t idx = add(s.request.prompt[s.prefilled], s.n_past, s.seq, last);
        if (last) s.batch_index = idx;
        s.prefilled++;
        s.n_past++;
      }
    } else {
      s.batch_index = add(s.last, s.n_past, s.seq, true);
      s.n_past++;
      // Drafts follow in consecutive rows, each with logits: the target's choice after each.
      for (llama_token d : s.drafts) {
        add(d, s.n_past, s.seq, true);
        s.n_past++;
      }
    }
  }
  if (batch_.n_tokens == 0) return;

  const auto decode_started = std::chrono::steady_clock::now();
  const int32_t status = llama_decode(ctx_, batch_);
  const uint64_t decode_ns = elapsed_ns(decode_started);
  // On a GPU llama_decode returns once the step's work is queued; the wait for it is timed apart.
  const auto wait_started = std::chrono::steady_clock::now();
  if (status == 0) llama_synchronize(ctx_);
  const uint64_t wait_ns = elapsed_ns(wait_started);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.steps++;
    stats_.decoded_tokens += static_cast<uint64_t>(batch_.n_tokens);
    stats_.decode_ns += decode_ns;
    stats_.wait_ns += wait_ns;
  }
  if (!expert_layers_.empty() && status == 0) {
    // A step adds at most its token count to one expert's counter.
    expert_unfolded_tokens_ += static_cast<uint64_t>(batch_.n_tokens);
    if (expert_unfolded_tokens_ > (1u << 23)) fold_expert_counts();
  }
  if (replace_every_ > 0 && status == 0 && (replace_tokens_ += static_cast<uint64_t>(batch_.n_tokens)) >= replace_every_) {
    fold_expert_counts();
    try {
      place();  // the same number of copies: copied into place, nothing allocated
    } catch (const std::exception& e) {
      replace_every_ = 0;  // the copies stay as they were; expert_placement_error() says why
      std::lock_guard<std::mutex> lock(mu_);
      place_error_ = e.what();
    }
  }
  if (!rpc_endpoints_.empty() && !(status == 2 && abort_decode_)) {
    // A lost connection zeroes what the server should have sent: the logits are garbage and must
    // not be sampled. Synchronize first (the sampler would anyway), then ask each connection.
    llama_synchronize(ctx_);
    const std::string why = rpc_failure(rpc_endpoints_);
    if (!why.empty()) {
      broken_ = "the RPC server " + why + ". The model's weights on it are gone: dispose the model and load it again once the server is back";
      for (auto& slot : slots_) {
        slot.kv_tokens.clear();
        if (slot.busy) fail(slot, "RPC_DISCONNECTED", broken_);
      }
      return;
    }
  }
  if (status != 0) {
    if (status == 2 && abort_decode_) return;  // stopping: the loop ends next
    const std::string message = status == 1 ? "llama_decode found no KV cache space for the batch"
                                            : "llama_decode failed with status " + std::to_string(status);
    for (size_t i : which) {
      slots_[i].kv_tokens.clear();  // what the failed decode left in the stream is unknown
      slots_[i].drafts.clear();
      if (slots_[i].busy) fail(slots_[i], "ENGINE", message);
    }
    return;
  }
  // What each slot's stream now holds (for the prompt cache).
  for (int32_t k = 0; k < batch_.n_tokens; ++k) slots_[static_cast<size_t>(batch_.seq_id[k][0])].kv_tokens.push_back(batch_.token[k]);
  if (checkpoint_every_ > 0) {
    for (size_t i : which) {
      Slot& s = slots_[i];
      const size_t at = s.kv_tokens.size();
      if (s.busy && s.prefilled < s.request.prompt.size() && at == s.prefilled && at % checkpoint_every_ == 0) save_checkpoint(s);
    }
  }
  const auto sample_started = std::chrono::steady_clock::now();
  choose_all(which);
  for (size_t i : which) {
    Slot& s = slots_[i];
    if (s.busy && s.batch_index >= 0) {
      if (s.drafts.empty()) {
        sample_slot(s);
      } else {
        verify(s);
      }
    }
    // What the target kept of this slot's rows (verify dropped rejected drafts) feeds the MTP.
    if (mtp_) mtp_collect(s, static_cast<int32_t>(s.n_past - past_before[i]));
  }
  const uint64_t sample_ns = elapsed_ns(sample_started);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.sample_ns += sample_ns;
}

void Engine::mtp_collect(Slot& s, int32_t kept) {
  if (kept <= 0 || s.batch_begin < 0 || !mtp_wanted(s)) return;
  const size_t n = static_cast<size_t>(n_embd_);
  const llama_pos p0 = batch_.pos[s.batch_begin];
  if (s.mtp_tokens.empty() || s.mtp_pos + static_cast<llama_pos>(s.mtp_tokens.size()) != p0) {
    s.mtp_tokens.clear();
    s.mtp_h.clear();
    s.mtp_pos = p0;
  }
  auto append = [&](const float* h) {
    if (h != nullptr) {
      s.mtp_h.insert(s.mtp_h.end(), h, h + n);
    } else {
      s.mtp_h.resize(s.mtp_h.size() + n, 0.0f);  // unknown (a cached prefix): a weaker draft, not a wrong one
    }
  };
  for (int32_t j = 0; j < kept; ++j) {
    s.mtp_tokens.push_back(batch_.token[s.batch_begin + j]);
    if (j == 0) {
      append(s.h_pos == p0 - 1 && !s.h_last.empty() ? s.h_last.data() : nullptr);
    } else {
      append(llama_get_embeddings_nextn_ith(ctx_, s.batch_begin + j - 1));
    }
  }
  const float* h = llama_get_embeddings_nextn_ith(ctx_, s.batch_begin + kept - 1);
  if (h != nullptr) {
    s.h_last.assign(h, h + n);
    s.h_pos = p0 + kept - 1;
  } else {
    s.h_last.clear();
    s.h_pos = -1;
  }
}

void Engine::mtp_draft(const std::vector<size_t>& which, const std::vector<uint32_t>& k) {
  // The MTP layer at position p reads the token there and the target's hidden state after p-1, and
  // predicts the token at p+1. Its context must hold every earlier position of the sequence, fed
  // with the target's states, before it drafts: first the rows the target kept since the last call
  // (positions missing for another reason, such as a prefix from the prompt cache, get zero states),
  // then the drafting sequences' newest token, then each draft with the MTP's own state.
  llama_memory_t mem = llama_get_memory(draft_ctx_);
  const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
  const size_t n = static_cast<size_t>(n_embd_);
  llama_batch& b = draft_batch_;
  b.n_tokens = 0;
  auto add = [&](llama_token token, llama_pos pos, llama_seq_id seq, const float* h, bool logits) {
    const int32_t row = batch_add(b, token, pos, seq, logits);
    if (h != nullptr) {
      std::memcpy(b.embd + static_cast<size_t>(row) * n, h, n * sizeof(float));
    } else {
      std::memset(b.embd + static_cast<size_t>(row) * n, 0, n * sizeof(float));
    }
    return row;
  };
  auto run = [&]() {
    const bool ok = b.n_tokens == 0 || llama_decode(draft_ctx_, b) == 0;
    b.n_tokens = 0;
    return ok;
  };
  auto failed = [&]() {
    // A draft that cannot run costs only its speed-up: every sequence starts its MTP history anew.
    for (auto& s : slots_) {
      s.drafts.clear();
      llama_memory_seq_rm(mem, s.seq, -1, -1);
      s.draft_kv.clear();
      s.mtp_tokens.clear();
      s.mtp_h.clear();
    }
  };
  const int32_t capacity = static_cast<int32_t>(n_batch_);
  // 1. Catch up, in chunks; the drafting sequences' first rows go in the last chunk when they fit.
  for (auto& s : slots_) {
    if (!s.busy || !mtp_wanted(s)) continue;
    s.drafts.clear();
    const llama_pos end = s.n_past;  // the MTP must hold [0, end)
    const llama_pos pending_end = s.mtp_pos + static_cast<llama_pos>(s.mtp_tokens.size());
    const bool pending = !s.mtp_tokens.empty() && pending_end == end;
    llama_pos from = static_cast<llama_pos>(common_prefix(s.draft_kv, s.kv_tokens));
    if (pending) from = std::min(from, s.mtp_pos);
    from = std::min(from, end);
    if (static_cast<llama_pos>(s.draft_kv.size()) > from) {
      if (!llama_memory_seq_rm(mem, s.seq, from, -1)) {
        llama_memory_seq_rm(mem, s.seq, -1, -1);  // cannot cut back here: from the start
        from = 0;
      }
      s.draft_kv.resize(static_cast<size_t>(from));
    }
    for (llama_pos p = from; p < end; ++p) {
      if (b.n_tokens == capacity && !run()) return failed();
      const llama_token token = s.kv_tokens[static_cast<size_t>(p)];
      const bool known = pending && p >= s.mtp_pos;
      add(token, p, s.seq, known ? s.mtp_h.data() + static_cast<size_t>(p - s.mtp_pos) * n : nullptr, false);
      s.draft_kv.push_back(token);
    }
    s.mtp_tokens.clear();
    s.mtp_h.clear();
  }
  // 2. Draft rounds: each drafting sequence's newest row, with logits and the state to chain on.
  std::vector<int32_t> row_of(slots_.size(), -1);
  std::vector<std::vector<float>> h(slots_.size());
  uint32_t rounds = 0;
  for (size_t i : which) rounds = std::max(rounds, k[i]);
  for (uint32_t r = 0; r < rounds; ++r) {
    int32_t rows = 0;
    for (size_t i : which) rows += (k[i] > r && slots_[i].drafts.size() == r) ? 1 : 0;
    if (rows == 0) break;
    if (b.n_tokens + rows > capacity && !run()) return failed();
    std::vector<size_t> round;
    for (size_t i : which) {
      Slot& s = slots_[i];
      if (k[i] <= r || s.drafts.size() != r) continue;
      const llama_pos pos = s.n_past + static_cast<llama_pos>(r);
      const llama_token token = r == 0 ? s.last : s.drafts.back();
      const float* state = r == 0 ? (s.h_pos == s.n_past - 1 && !s.h_last.empty() ? s.h_last.data() : nullptr) : h[i].data();
      row_of[i] = add(token, pos, s.seq, state, true);
      s.draft_kv.push_back(token);
      round.push_back(i);
    }
    if (!run()) return failed();
    for (size_t i : round) {
      Slot& s = slots_[i];
      s.drafts.push_back(argmax(llama_get_logits_ith(draft_ctx_, row_of[i]), n_vocab));
      const float* next = llama_get_embeddings_nextn_ith(draft_ctx_, row_of[i]);
      if (next == nullptr) return failed();
      h[i].assign(next, next + n);
    }
  }
  if (!run()) return failed();  // catch-up rows when no sequence drafts
  // Drafts were fed with the MTP's own states: drop them, so the context holds only rows fed with
  // the target's (the target's kept rows come back through mtp_collect).
  for (size_t i : which) {
    Slot& s = slots_[i];
    if (static_cast<llama_pos>(s.draft_kv.size()) > s.n_past) {
      if (llama_memory_seq_rm(mem, s.seq, s.n_past, -1)) {
        s.draft_kv.resize(static_cast<size_t>(s.n_past));
      } else {
        llama_memory_seq_rm(mem, s.seq, -1, -1);
        s.draft_kv.clear();
      }
    }
  }
}

void Engine::draft(const std::vector<size_t>& which, const std::vector<uint32_t>& k) {
  llama_memory_t mem = llama_get_memory(draft_ctx_);
  const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
  auto failed = [&](const std::vector<size_t>& slots) {
    // A draft that cannot run costs only its speed-up: these sequences go on without drafts.
    for (size_t i : slots) {
      Slot& s = slots_[i];
      s.drafts.clear();
      llama_memory_seq_rm(mem, s.seq, -1, -1);
      s.draft_kv.clear();
    }
  };
  auto add = [&](llama_token token, llama_pos pos, llama_seq_id seq, bool logits) { return batch_add(draft_batch_, token, pos, seq, logits); };
  // 1. Catch up: the draft context must hold each sequence's history and its last token; the
  //    logits after that give the first draft. Long catch-ups (a new prompt) go in chunks.
  std::vector<int32_t> row_of(slots_.size(), -1);
  std::vector<size_t> in_batch;
  auto run = [&]() {
    if (draft_batch_.n_tokens == 0) return true;
    if (llama_decode(draft_ctx_, draft_batch_) != 0) return false;
    for (size_t i : in_batch) {
      Slot& s = slots_[i];
      if (row_of[i] >= 0) {
        s.drafts.assign(1, argmax(llama_get_logits_ith(draft_ctx_, row_of[i]), n_vocab));
        row_of[i] = -1;
      }
    }
    draft_batch_.n_tokens = 0;
    in_batch.clear();
    return true;
  };
  draft_batch_.n_tokens = 0;
  for (size_t i : which) {
    Slot& s = slots_[i];
    s.drafts.clear();
    std::vector<llama_token> want = s.kv_tokens;
    want.push_back(s.last);
    size_t lcp = common_prefix(s.draft_kv, want);
    if (lcp == want.size()) --lcp;  // the last token is decoded again for its logits
    if (!llama_memory_seq_rm(mem, s.seq, static_cast<llama_pos>(lcp), -1)) {
      llama_memory_seq_rm(mem, s.seq, -1, -1);  // a recurrent draft that cannot roll back: from the start
      lcp = 0;
    }
    s.draft_kv.resize(lcp);
    for (size_t p = lcp; p < want.size(); ++p) {
      if (draft_batch_.n_tokens == static_cast<int32_t>(n_batch_) && !run()) return failed(which);
      const bool final = p + 1 == want.size();
      const int32_t row = add(want[p], static_cast<llama_pos>(p), s.seq, final);
      if (final) row_of[i] = row;
      if (in_batch.empty() || in_batch.back() != i) in_batch.push_back(i);
      s.draft_kv.push_back(want[p]);
    }
  }
  if (!run()) return failed(which);
  // 2. Each further round decodes every sequence's newest draft and takes the argmax after it.
  uint32_t rounds = 0;
  for (size_t i : which) rounds = std::max(rounds, k[i]);
  for (uint32_t r = 1; r < rounds; ++r) {
    for (size_t i : which) {
      Slot& s = slots_[i];
      if (s.drafts.size() != r || k[i] <= r) continue;
      row_of[i] = add(s.drafts.back(), static_cast<llama_pos>(s.draft_kv.size()), s.seq, true);
      s.draft_kv.push_back(s.drafts.back());
      in_batch.push_back(i);
    }
    if (draft_batch_.n_tokens == 0) break;
    std::vector<size_t> round = in_batch;
    if (llama_decode(draft_ctx_, draft_batch_) != 0) return failed(which);
    for (size_t i : round) {
      slots_[i].drafts.push_back(argmax(llama_get_logits_ith(draft_ctx_, row_of[i]), n_vocab));
      row_of[i] = -1;
    }
    draft_batch_.n_tokens = 0;
    in_batch.clear();
  }
}

void Engine::verify(Slot& s) {
  const std::vector<llama_token> drafts = std::move(s.drafts);
  s.drafts.clear();
  const int32_t row = s.batch_index;
  s.batch_index = -1;
  // The target's own token at each position, in order (a sampler advances as it goes), until the
  // first that differs from the draft there: that one is the target's correction (or, all agreeing,
  // the bonus token after the last draft).
  std::vector<llama_token> chosen;
  for (size_t i = 0; i <= drafts.size(); ++i) {
    llama_token t;
    if (!choose(s, row + static_cast<int32_t>(i), t)) return;
    chosen.push_back(t);
    if (i == drafts.size() || t != drafts[i]) break;
  }
  const size_t accepted = chosen.size() - 1;
  // The KV streams keep the last token and the accepted drafts; the rest is dropped.
  const llama_pos base = s.n_past - 1 - static_cast<llama_pos>(drafts.size());
  s.n_past = base + 1 + static_cast<llama_pos>(accepted);
  if (!llama_memory_seq_rm(llama_get_memory(ctx_), s.seq, s.n_past, -1)) {
    s.kv_tokens.clear();
    llama_memory_seq_rm(llama_get_memory(ctx_), s.seq, -1, -1);
    fail(s, "ENGINE", "llama.cpp could not roll the sequence's state back over its rejected drafts");
    return;
  }
  s.kv_tokens.resize(static_cast<size_t>(s.n_past));
  if (s.draft_kv.size() > static_cast<size_t>(s.n_past)) {
    if (llama_memory_seq_rm(llama_get_memory(draft_ctx_), s.seq, s.n_past, -1)) {
      s.draft_kv.resize(static_cast<size_t>(s.n_past));
    } else {
      llama_memory_seq_rm(llama_get_memory(draft_ctx_), s.seq, -1, -1);
      s.draft_kv.clear();
    }
  }
  s.draft_tokens += static_cast<int32_t>(drafts.size());
  s.draft_accepted += static_cast<int32_t>(accepted);
  const int32_t max_k = draft_limit(s);
  if (accepted == drafts.size()) {
    s.draft_k = std::min(max_k, static_cast<int32_t>(drafts.size()) + 1);
  } else if (accepted > 0) {
    s.draft_k = static_cast<int32_t>(accepted) + 1;
  } else {
    s.draft_k = static_cast<int32_t>(drafts.size()) / 2;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.draft_tokens += drafts.size();
    stats_.draft_accepted += accepted;
  }
  for (llama_token t : chosen) {
    if (!accept(s, t)) return;
  }
}

void Engine::sample_slot(Slot& s) {
  const int32_t row = s.batch_index;
  s.batch_index = -1;
  if (s.request.external_sampling) {
    const float* logits = llama_get_logits_ith(ctx_, row);
    Event e;
    e.id = s.request.id;
    e.kind = Event::Kind::Logits;
    e.logits.assign(logits, logits + llama_vocab_n_tokens(vocab_));
    s.awaiting = true;
    push(std::move(e));
    return;
  }
  llama_token token;
  if (s.preselected) {
    s.preselected = false;
    if (!s.preselect_error.empty()) {
      fail(s, "SAMPLING", s.preselect_error);
      return;
    }
    token = s.preselected_token;
  } else if (!choose(s, row, token)) {
    return;
  }
  accept(s, token);
}

void Engine::choose_all(const std::vector<size_t>& which) {
  std::vector<Slot*> todo;
  for (size_t i : which) {
    Slot& s = slots_[i];
    if (s.busy && s.batch_index >= 0 && s.drafts.empty() && !s.request.external_sampling) todo.push_back(&s);
  }
  // One sequence: no threads to start (sample_slot chooses). Sampling is 0.1-0.3 ms per sequence
  // over a 150k vocabulary, which at 64 sequences was a third of a GPU decode step when done one
  // after another.
  if (todo.size() < 2 || threads_ < 2) return;
  // llama_get_logits_ith reorders the output rows on first use: call it here, on this thread.
  std::vector<const float*> rows;
  for (Slot* s : todo) rows.push_back(llama_get_logits_ith(ctx_, s->batch_index));
  const int n = static_cast<int>(todo.size());
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic) num_threads(std::min(threads_, n))
#endif
  for (int k = 0; k < n; ++k) {
    Slot& s = *todo[static_cast<size_t>(k)];
#ifdef _OPENMP
    auto& scratch = thread_scratch_[static_cast<size_t>(omp_get_thread_num())];
#else
    auto& scratch = scratch_;
#endif
    s.preselect_error.clear();
    try {
      s.preselected_token = pick(s, rows[static_cast<size_t>(k)], scratch);
    } catch (const std::exception& e) {
      s.preselect_error = *e.what() != '\0' ? e.what() : "sampling failed";
    }
    s.preselected = true;
  }
}

llama_token Engine::pick(Slot& s, const float* logits, std::vector<llama_token_data>& scratch) const {
  if (logits == nullptr) throw std::runtime_error("llama.cpp has no logits for this sequence's row");
  const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
  return is_plain_greedy(s.request.sampling) ? argmax(logits, n_vocab) : sample_token(s.sampler.get(), logits, n_vocab, scratch);
}

bool Engine::choose(Slot& s, int32_t row, llama_token& token) {
  try {
    token = pick(s, llama_get_logits_ith(ctx_, row), scratch_);
  } catch (const std::exception& e) {
    fail(s, "SAMPLING", e.what());
    return false;
  }
  return true;
}

bool Engine::accept(Slot& s, llama_token token) {
  if (!s.has_first_token) {
    s.has_first_token = true;
    s.first_token = Clock::now();
  }
  s.generated++;
  s.unsent.push_back(token);

  if (!s.request.ignore_eos && llama_vocab_is_eog(vocab_, token)) {
    finish(s, "eog");
    return false;
  }
  auto update = s.text.push(token_piece(vocab_, token));
  Event e;
  e.text = std::move(update.delta);
  if (update.stopped) {
    finish_with(s, "stop", std::move(e.text));
    return false;
  }
  if (s.request.max_tokens >= 0 && s.generated >= s.request.max_tokens) {
    finish_with(s, "length", std::move(e.text));
    return false;
  }
  if (static_cast<uint32_t>(s.n_past) + 1 > n_ctx_seq_) {
    finish_with(s, "context", std::move(e.text));
    return false;
  }
  s.last = token;
  e.id = s.request.id;
  e.kind = Event::Kind::Tokens;
  e.tokens.swap(s.unsent);
  push(std::move(e));
  return true;
}

void Engine::finish(Slot& s, const char* reason) { finish_with(s, reason, std::string()); }

void Engine::finish_with(Slot& s, const char* reason, std::string text) {
  Event e;
  e.id = s.request.id;
  e.kind = Event::Kind::Done;
  e.finish_reason = reason;
  e.tokens.swap(s.unsent);
  // A stop string ends the text where it starts; anything else releases what was held back.
  e.text = std::string(reason) == "stop" ? std::move(text) : text + s.text.flush();
  e.prompt_tokens = static_cast<int32_t>(s.prompt_tokens);
  e.completion_tokens = s.generated;
  e.draft_tokens = s.draft_tokens;
  e.draft_accepted = s.draft_accepted;
  e.preemptions = s.preemptions;
  const auto now = Clock::now();
  e.timings.queued_ms = ms_between(s.submitted, s.admitted);
  if (s.has_first_token) {
    e.timings.prompt_ms = ms_between(s.admitted, s.first_token);
    e.timings.generation_ms = ms_between(s.first_token, now);
    e.timings.time_to_first_token_ms = ms_between(s.submitted, s.first_token);
  }
  release(s);
  push(std::move(e));
}

void Engine::fail(Slot& s, const std::string& code, const std::string& message) {
  Event e;
  e.id = s.request.id;
  e.kind = Event::Kind::Error;
  e.error_code = code;
  e.error_message = message;
  e.tokens.swap(s.unsent);
  e.completion_tokens = s.generated;
  release(s);
  push(std::move(e));
}

void Engine::release(Slot& s) {
  s.preselected = false;
  // Nothing known to cache (a failed decode cleared kv_tokens): its cells go too.
  if (!prompt_cache_ || s.kv_tokens.empty()) {
    llama_memory_seq_rm(llama_get_memory(ctx_), s.seq, -1, -1);
    s.kv_tokens.clear();
    s.segments.clear();
    if (draft_ctx_ != nullptr) llama_memory_seq_rm(llama_get_memory(draft_ctx_), s.seq, -1, -1);
    s.draft_kv.clear();
    s.mtp_tokens.clear();
    s.mtp_h.clear();
    s.h_last.clear();
    s.h_pos = -1;
  }
  s.drafts.clear();
  s.draft_tokens = 0;
  s.draft_accepted = 0;
  s.draft_k = -1;
  s.draft_pause = 0;
  s.awaiting = false;
  s.sampler.reset();
  s.busy = false;
  s.released_at = ++releases_;
  s.batch_index = -1;
  s.request = Request();
  std::lock_guard<std::mutex> lock(mu_);
  stats_.active--;
  stats_.kv_used_tokens -= std::min<uint64_t>(stats_.kv_used_tokens, static_cast<uint64_t>(s.n_past));
}

}  // namespace genesis
