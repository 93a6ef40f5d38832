// The continuous-batching engine: one per loaded model context, with its own thread.
//
// Each step (shape of llama-server's update_slots): admit queued requests into free sequence
// slots, take one token from every generating sequence plus prompt chunks up to the step's token
// budget (chunked prefill), run one llama_decode, then sample each sequence that produced logits.
// Results go to an outbox; the owner is notified once when the outbox goes from empty to
// non-empty, so many tokens of many sequences reach JS in one call.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <stdexcept>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "engine/sampling.h"
#include "engine/text.h"
#include "llama.h"

namespace genesis {

// Tokens routed to each expert of one MoE layer since the engine started (or the last reset).
struct ExpertLayerCounts {
  int32_t layer = 0;
  std::vector<uint64_t> counts;  // one per expert
};

struct EngineOptions {
  uint32_t context_size = 4096;  // tokens per sequence
  uint32_t max_sequences = 4;
  uint32_t batch_size = 512;     // token budget of one step
  int32_t threads = 0;           // 0: hardware concurrency
  bool kv_unified = false;       // one KV buffer shared by all sequences (masked attention)
  // With kv_unified: cells in the shared pool (0: context_size x max_sequences, room for every
  // sequence at full length). Smaller, sequences share the memory: a request is admitted when its
  // prompt fits beside what the running ones hold, and when the running ones outgrow the pool the
  // lowest-priority, latest admitted is preempted (its cells dropped; it is recomputed from its
  // prompt and the tokens it generated when it is admitted again, its sampler and text state kept).
  uint32_t kv_budget = 0;
  // Shared KV pool: host memory that preempted sequences' KV may take (0: none, each is recomputed).
  // While a preempted sequence's cells (and recurrent state) fit beside the others copied out, they
  // are copied here and copied back into free cells when it is admitted again, instead of its
  // prompt and generated tokens being computed again; over the limit it is recomputed.
  uint64_t kv_swap_memory = 0;
  // Paged attention (with kv_unified and flash attention): each sequence's attention reads only its
  // own cells, through per-sequence index lists (native/patches/0004-paged-attention.patch).
  bool kv_paged = false;
  // Paged: the pool's cells are taken in aligned blocks of this many (llama_context_params.
  // kv_block_size). A sequence fills its last block before it takes another whose cells are all
  // free, prefixes are shared between sequences in whole blocks, and the pool is counted in blocks.
  uint32_t kv_block_size = 1;
  // KV cache element types (llama.cpp's -ctk/-ctv). A quantized V needs flash attention.
  ggml_type type_k = GGML_TYPE_F16;
  ggml_type type_v = GGML_TYPE_F16;
  // Group-limited MoE routing in one op (native/patches/0005-moe-group-topk.patch).
  bool moe_group_topk = false;
  bool deterministic = false;    // decode each sequence on its own: output independent of the batch
  // Keep a finished sequence's KV in its slot and reuse its longest common prefix with the next
  // prompt admitted there (llama-server's cache_prompt). Off with deterministic, and with
  // kv_unified unless kv_budget is set.
  bool prompt_cache = true;
  // Recurrent and hybrid models (a state that cannot be cut back to a prefix): with the prompt cache,
  // each sequence keeps up to this many copies of its recurrent state, taken in host memory where a
  // prompt crosses a multiple of batch_size tokens, so a later prompt sharing only part of the cached
  // tokens restarts from the nearest copy at or below the shared prefix (llama-server's context
  // checkpoints). 0: off (the prefix is then reused only where the state sits exactly at its end).
  uint32_t state_checkpoints = 4;
  // Host memory all those copies may hold together (0: no limit); over it, the least recently taken
  // or used copies go first (a sequence's newest copy stays).
  uint64_t state_checkpoint_memory = 0;
  int32_t flash_attention = -1;  // -1: llama.cpp decides, 0: off, 1: on
  uint32_t max_queue = 0;        // requests waiting for a sequence before submit refuses; 0: no limit
  // RPC servers holding part of the model: after each decode the engine checks their connections,
  // and a lost one fails every request (RPC_DISCONNECTED) instead of returning garbage.
  std::vector<std::string> rpc_endpoints;
  // Speculative decoding: a smaller model with the same vocabulary proposes up to draft_max tokens
  // per sequence and step (greedily, in its own context); the target checks them all in one decode
  // and keeps the prefix its own sampler agrees with, plus its own next token. Output is exactly the
  // target's: greedy token for token; sampled, each position is the target's own draw. Not with
  // deterministic (each sequence alone) mode.
  llama_model* draft_model = nullptr;
  uint32_t draft_max = 0;
  // Or the model's own multi-token-prediction (MTP/NextN) layers draft, in a second context of
  // llama.cpp's MTP type on the same weights (the model must be loaded with load_mtp): each draft
  // row pairs a token with the target's hidden state before it (see Engine::mtp_draft).
  bool mtp = false;
  // Expert-load statistics: count, per MoE layer and expert, the tokens routed there (on the
  // device, inside each step's graph; native/patches/0003). Read with Engine::expert_counts().
  bool expert_stats = false;
  // Expert placement (native/patches/0010): for every MoE layer whose experts are in host memory
  // (cpu_moe_layers, or a layer on the CPU), copies of this many of its experts on the layer's
  // device, which computes the tokens routed to them while the CPU computes the others. Which
  // experts: the most routed to by expert_heat (counts of an earlier run) plus, with expert_stats,
  // what this engine counts (halved at each new choice, so recent traffic weighs most). Chosen at
  // start, by place_experts(), and every expert_replace_tokens decoded tokens (0: never by itself).
  uint32_t gpu_experts = 0;
  std::vector<ExpertLayerCounts> expert_heat;
  uint64_t expert_replace_tokens = 0;
};

// Which experts of one MoE layer have copies on its device (EngineOptions::gpu_experts).
struct ExpertPlacement {
  int32_t layer = 0;
  std::vector<int32_t> experts;  // hottest first
  uint64_t bytes = 0;            // the copies and their maps on the device
  // With expert statistics, since this choice: expert picks (tokens x routed experts), and how
  // many of them went to the copies.
  uint64_t routed = 0;
  uint64_t routed_to_copies = 0;
};

// The llama.cpp context parameters of an engine with `options` (the engine adds its abort callback).
llama_context_params engine_context_params(const EngineOptions& options);
// Threads an engine uses: options.threads, or the hardware concurrency when 0.
int32_t engine_threads(const EngineOptions& options);

// An engine option this model or combination cannot have (the addon reports it as INVALID_OPTION).
struct InvalidEngineOption : std::invalid_argument {
  InvalidEngineOption(std::string option, std::string expected, const std::string& message)
      : std::invalid_argument(message), option(std::move(option)), expected(std::move(expected)) {}
  std::string option;
  std::string expected;
};

// submit() refuses a request when max_queue requests already wait.
struct QueueFull : std::runtime_error {
  explicit QueueFull(uint32_t queued) : std::runtime_error("queue full"), queued(queued) {}
  uint32_t queued;
};

struct Request {
  uint64_t id = 0;
  std::vector<llama_token> prompt;
  SamplingParams sampling;
  int32_t max_tokens = -1;  // < 0: until end of generation or the context is full
  std::vector<std::string> stop;
  int32_t priority = 0;     // higher first; FIFO among equals
  bool ignore_eos = false;
  int32_t draft_max = -1;   // tokens to draft per step: -1 the engine's draft_max, 0 none
  // Logit fusion: instead of sampling, each step's logits go out in a Logits event and the slot
  // waits for feed(id, token) (the token chosen over several models), then takes it as its own.
  bool external_sampling = false;
};

struct Timings {
  double queued_ms = 0;         // submit -> admitted into a sequence slot
  double prompt_ms = 0;         // admitted -> first token sampled (prefill)
  double generation_ms = 0;     // first token -> finished
  double time_to_first_token_ms = 0;  // submit -> first token
};

struct Event {
  enum class Kind { Tokens, Done, Error, Logits };
  uint64_t id = 0;
  Kind kind = Kind::Tokens;
  std::vector<llama_token> tokens;  // tokens sampled since the previous event of this request
  std::string text;                 // text released since the previous event
  // Done
  std::string finish_reason;        // "eog" | "stop" | "length" | "context" | "abort"
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t draft_tokens = 0;      // proposed by the draft model
  int32_t draft_accepted = 0;    // of those, kept (each saved one target decode step)
  int32_t preemptions = 0;       // times the request was preempted (shared KV pool) and recomputed
  Timings timings;
  // Error
  std::string error_code;
  std::string error_message;
  // Logits (external sampling): the vocabulary's logits after the sequence's latest token
  std::vector<float> logits;
};

struct EngineStats {
  uint32_t active = 0;
  uint32_t queued = 0;
  uint64_t steps = 0;
  uint64_t decoded_tokens = 0;
  uint64_t prompt_tokens = 0;         // prompt tokens of admitted requests (again when readmitted)
  uint64_t cached_prompt_tokens = 0;  // prompt tokens taken from a slot's cache instead of decoded
  uint64_t kv_used_tokens = 0;  // tokens held in the KV cache by active sequences
  uint64_t draft_tokens = 0;    // speculative decoding: tokens the draft model proposed
  uint64_t draft_accepted = 0;  // and the target kept
  uint64_t shared_prefix_copies = 0;  // prompts started from another sequence's KV (copied)
  uint64_t preemptions = 0;           // sequences preempted for room in the shared KV pool
  uint64_t kv_pool_tokens = 0;        // cells of the shared KV pool (0: one stream per sequence)
  uint64_t kv_pool_used_tokens = 0;   // of those, held after the latest step: running sequences and
                                      // the cache of finished ones, shared cells once
  uint32_t kv_block_size = 1;         // cells per block of the pool (paged; 1 otherwise)
  uint64_t kv_pool_blocks = 0;        // the pool's blocks, and those holding a used cell
  uint64_t kv_pool_used_blocks = 0;   // (the cells of a partly filled block count as held)
  uint64_t kv_swap_outs = 0;          // preempted sequences whose KV was copied to host memory
  uint64_t kv_swap_ins = 0;           // and copied back when admitted again (not recomputed)
  uint64_t kv_swap_bytes = 0;         // host memory those copies hold now
  uint64_t state_checkpoint_restores = 0;  // prompts started from a recurrent-state copy
  uint64_t state_checkpoint_bytes = 0;     // host memory those copies hold now
  // Where the engine thread's time goes, in nanoseconds since load: whole steps (admission,
  // scheduling, decode, sampling, drafting), the llama_decode call itself (graph build and, on a
  // GPU, kernel launches), the wait for the device to finish the step's work, and sampling
  // (including draft verification).
  uint64_t step_ns = 0;
  uint64_t decode_ns = 0;
  uint64_t wait_ns = 0;
  uint64_t sample_ns = 0;
};

class Engine {
 public:
  using Notify = std::function<void()>;

  // Creates the llama context; throws std::runtime_error when llama.cpp refuses.
  Engine(llama_model* model, const EngineOptions& options, Notify notify);
  ~Engine();

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  uint32_t context_size() const { return n_ctx_seq_; }
  uint32_t max_sequences() const { return n_seq_max_; }
  uint32_t batch_size() const { return n_batch_; }
  uint32_t max_queue() const { return max_queue_; }
  bool kv_paged() const { return kv_paged_; }
  uint32_t kv_block_size() const { return block_; }
  ggml_type type_k() const { return type_k_; }
  ggml_type type_v() const { return type_v_; }
  bool moe_group_topk() const { return moe_group_topk_; }
  uint32_t total_context() const;
  const llama_context* context() const { return ctx_; }
  const llama_context* draft_context() const { return draft_ctx_; }

  void submit(Request request);
  void cancel(uint64_t id);
  // The token an external sampler chose for a request waiting after a Logits event.
  void feed(uint64_t id, llama_token token);
  // Asks the thread to stop: every queued and active request finishes with a DISPOSED error.
  void stop();
  // Waits for the thread to end (call after stop()).
  void join();

  std::vector<Event> drain();
  EngineStats stats();
  bool expert_stats() const { return !expert_layers_.empty(); }
  // The expert counters of every MoE layer, read by the engine thread between steps (the caller
  // blocks until then: call it off the JS thread); reset zeroes them after the read. Throws when
  // the engine has no counters or stops first.
  std::vector<ExpertLayerCounts> expert_counts(bool reset);
  // Expert placement: the current copies per layer (empty without gpu_experts; with expert_stats,
  // their routed counts up to the current step, read between steps), and a new choice from `heat`
  // (counts of an earlier run; empty: the engine's own), made between steps. Both block the caller
  // until then: call them off the JS thread.
  bool expert_placement_on() const { return !place_layers_.empty(); }
  std::vector<ExpertPlacement> expert_placement();
  // Why the periodic re-choice (expert_replace_tokens) stopped; empty while it runs.
  std::string expert_placement_error();
  std::vector<ExpertPlacement> place_experts(const std::vector<ExpertLayerCounts>& heat);
  // Throws InvalidEngineOption when `heat` names a layer without routed experts or with another count.
  void check_heat(const std::vector<ExpertLayerCounts>& heat) const;

 private:
  using Clock = std::chrono::steady_clock;

  // What a preempted sequence takes back into the queue besides its request (whose prompt is then
  // the original prompt plus the tokens generated so far): the state its output depends on.
  struct Resume {
    size_t prompt_tokens = 0;  // of the original prompt
    int32_t generated = 0;
    int32_t preemptions = 0;   // including this one
    SamplerPtr sampler;        // RNG, penalty history, grammar state
    TextStream text{{}};       // held-back bytes and stop-string state
    Clock::time_point admitted, first_token;
    bool has_first_token = false;
    // EngineOptions::kv_swap_memory: the sequence's KV and recurrent state, as
    // llama_state_seq_get_data wrote them, holding the first swapped_tokens of the resumed prompt;
    // empty when it is recomputed. Its bytes are counted in swap_bytes until dropped.
    std::vector<uint8_t> swapped;
    size_t swapped_tokens = 0;
    std::atomic<uint64_t>* swap_bytes = nullptr;
    void drop_swap() {
      if (swap_bytes != nullptr) *swap_bytes -= swapped.size();
      std::vector<uint8_t>().swap(swapped);
      swap_bytes = nullptr;
    }
    ~Resume() { drop_swap(); }
  };

  struct Pending {
    Request request;
    uint64_t order = 0;
    Clock::time_point submitted;
    std::shared_ptr<Resume> resume;  // set when the request was preempted
  };

  struct Slot {
    bool busy = false;
    llama_seq_id seq = 0;
    Request request;
    SamplerPtr sampler;
    TextStream text{{}};
    size_t prefilled = 0;          // prompt tokens already decoded
    llama_pos n_past = 0;          // tokens in this sequence's KV
    llama_token last = 0;          // sampled token still to be decoded
    int32_t generated = 0;
    int32_t batch_index = -1;      // logits row in the current batch, -1: none
    std::vector<llama_token> unsent;
    std::vector<llama_token> kv_tokens;  // the tokens whose KV this slot's stream holds, in order
    // Shared KV pool: where those tokens' cells came from. Each segment runs from its start to the
    // next one's (the last to kv_tokens.size()); cells of one origin were written once, by the
    // sequence that computed them, and are shared with every sequence that copied them (llama.cpp
    // copies within one stream by reference). The pool's used cells are the union over origins.
    struct Segment {
      uint64_t origin;
      size_t start;
    };
    std::vector<Segment> segments;
    // Recurrent and hybrid models: copies of the recurrent state after the first `tokens` of
    // kv_tokens, oldest first (EngineOptions::state_checkpoints).
    struct StateCheckpoint {
      size_t tokens;
      std::vector<uint8_t> data;
      uint64_t used = 0;  // when it was taken or last restored (checkpoint_clock_)
    };
    std::vector<StateCheckpoint> checkpoints;
    uint64_t released_at = 0;            // release order; 0: never used (for least-recently-used ties)
    uint64_t admitted_order = 0;
    uint64_t order = 0;            // the request's arrival order (kept through preemption)
    size_t prompt_tokens = 0;      // of the request's original prompt (a resumed one's prompt is longer)
    int32_t preemptions = 0;       // times this request was preempted so far
    Clock::time_point submitted, admitted, first_token;
    bool has_first_token = false;
    // Speculative decoding
    std::vector<llama_token> draft_kv;  // tokens whose KV the draft context holds for this sequence
    std::vector<llama_token> drafts;    // proposed this step, checked by the next target decode
    int32_t draft_tokens = 0;
    int32_t draft_accepted = 0;
    // Adaptive draft length: all kept → one more next step; some → as many as were kept plus one;
    // none → half. At 0 the sequence drafts nothing, then tries one token again after 16 steps.
    int32_t draft_k = -1;  // -1: not set yet (the request's maximum)
    int32_t draft_pause = 0;
    // MTP: rows (token at position p, the target's hidden state after p-1) kept by the target but
    // not yet in the MTP context; h_last is the hidden state after the newest kept token.
    int32_t batch_begin = -1;               // this slot's first row in the current target batch
    llama_pos mtp_pos = 0;                  // position of mtp_tokens[0]
    std::vector<llama_token> mtp_tokens;
    std::vector<float> mtp_h;               // mtp_tokens.size() rows of n_embd
    std::vector<float> h_last;              // empty: unknown (zeros are used)
    llama_pos h_pos = -1;                   // position of the token h_last follows
    bool awaiting = false;  // external sampling: logits sent, waiting for feed()
    // Chosen ahead by choose_all (in parallel with other slots) for this step; error: why not.
    bool preselected = false;
    llama_token preselected_token = 0;
    std::string preselect_error;
  };

  void loop();
  // Frees the contexts, batches and thread pool (the destructor, and a constructor that throws).
  void free_native();
  void admit();
  // Puts a waiting request into a free slot: `cached` of its prompt tokens are in the slot already,
  // or `donor_tokens` are copied from the donor's stream.
  // swap_in: the request's KV goes back from its host copy (Resume::swapped) instead of from the
  // cache or the donor.
  void start(Slot& slot, Pending p, size_t cached, Slot* donor, size_t donor_tokens, bool swap_in);
  // Shorter shared prefixes are computed again rather than copied or waited for.
  static constexpr size_t kSharedPrefixMin = 32;
  void apply_cancels(const std::unordered_set<uint64_t>& ids);
  void apply_feeds(const std::vector<std::pair<uint64_t, llama_token>>& feeds);
  void step();
  // One llama_decode over the slots `which` (their `take` tokens), then their sampling.
  void decode(const std::vector<size_t>& which, const std::vector<uint32_t>& take);
  void sample_slot(Slot& slot);
  // Token choice (argmax or the slot's sampler chain) for every slot in `which` that samples one
  // plain token this step, spread over the engine's threads; sample_slot then takes the result.
  void choose_all(const std::vector<size_t>& which);
  // The slot's token from a logits row: argmax when plainly greedy, else its sampler chain (which
  // uses `scratch`); throws on a missing row or a sampler failure.
  llama_token pick(Slot& slot, const float* logits, std::vector<llama_token_data>& scratch) const;
  // The target's token at a batch row (greedy or the slot's sampler); false when the slot failed.
  bool choose(Slot& slot, int32_t row, llama_token& token);
  // Takes a chosen token: events, end conditions; true while the slot keeps generating.
  bool accept(Slot& slot, llama_token token);
  // Speculative decoding: the draft proposals of this step for the slots `which`.
  void draft(const std::vector<size_t>& which, const std::vector<uint32_t>& k);
  // The same with the model's MTP layers: first the rows the target kept since the last call, then
  // each drafting sequence's next token with the target's hidden state, then the MTP's own.
  void mtp_draft(const std::vector<size_t>& which, const std::vector<uint32_t>& k);
  // Whether a slot's rows go to the MTP context: not when its request drafts nothing.
  bool mtp_wanted(const Slot& slot) const { return draft_limit(slot) > 0 && !slot.request.external_sampling; }
  // After a target decode: queues the rows of `slot` it kept (`kept` from batch_begin) for the MTP.
  void mtp_collect(Slot& slot, int32_t kept);
  // Checks a slot's drafts against the target logits (rows from batch_index) and keeps what agrees.
  void verify(Slot& slot);
  // Most tokens a sequence may draft per step: its request's draft_max, else the engine's.
  int32_t draft_limit(const Slot& slot) const {
    return slot.request.draft_max < 0 ? static_cast<int32_t>(draft_max_) : slot.request.draft_max;
  }
  void finish(Slot& slot, const char* reason);
  void finish_with(Slot& slot, const char* reason, std::string text);
  void fail(Slot& slot, const std::string& code, const std::string& message);
  // Every request still waiting for a slot ends with this error.
  void fail_waiting(const std::string& code, const std::string& message);
  void release(Slot& slot);
  // Shared KV pool: cells the busy sequences hold, and the preemption of the lowest-priority,
  // latest admitted busy sequence back into the queue (false when none is busy).
  uint64_t pool_used() const;
  // Paged pool in blocks: the cells the pool gives up when the slot's sequence appends n tokens:
  // the fresh blocks it takes once the free cells after its last one are filled (all n, when
  // `fresh`: a sequence about to be copied or restored into new blocks). n itself in cells.
  uint64_t cells_for(const Slot& slot, uint64_t n, bool fresh = false) const;
  // And the tokens it can append with `cells` free cells of the pool.
  uint64_t tokens_within(const Slot& slot, uint64_t cells) const;
  // The tokens the slot's sequence can append in its last block (paged pool in blocks).
  uint64_t tail_room(const Slot& slot) const;
  bool preempt_one();
  // Copies a preempted sequence's KV to host memory for its resumption, when it fits in
  // kv_swap_memory beside the other copies.
  void swap_out(const Slot& s, Resume& r);
  // Drops a slot's cells (and its cache of them), or those from position keep on.
  void drop_kv(Slot& slot);
  void trim_kv(Slot& slot, size_t keep);
  // Recurrent state copies: take one of the slot's state now (its prefill at a multiple of
  // checkpoint_every_); put the newest at or below `keep` tokens back as the recurrent state, and
  // return its token count (kNoCheckpoint: none usable; trim_kv then cuts the attention cells).
  void save_checkpoint(Slot& slot);
  void add_checkpoint(Slot& slot, Slot::StateCheckpoint checkpoint);
  static constexpr size_t kNoCheckpoint = static_cast<size_t>(-1);
  size_t restore_checkpoint(Slot& slot, size_t keep);
  // Of `shared` tokens of the slot's cache that a prompt starts with, those it can reuse: all of
  // them, except for a recurrent state, which only restarts from its end or from a copy.
  size_t reusable(const Slot& slot, size_t shared) const;
  // Drops the slot's copies past `keep` tokens (all with 0), keeping the byte count.
  void drop_checkpoints(Slot& slot, size_t keep);
  // The byte count changed by `added` minus `freed` (published in stats_).
  void count_checkpoint_bytes(uint64_t added, uint64_t freed);
  // Drops the least recently used finished sequence's cached cells, other than keep_a's and
  // keep_b's; false when there is none.
  bool evict_cached(const Slot* keep_a, const Slot* keep_b);
  void push(Event event);
  // Wakes the owner (notify) for the events pushed since it last drained: once per engine
  // iteration, after the step's sampling, rather than at the first event. Waking the JS thread
  // hands it a core; with every other core busy (the CPU backend's threads spin after a graph) the
  // engine thread was the one preempted, mid-sampling: 0.1-0.2 ms per step on 2 cores, and about
  // a third of a 64-sequence decode step on an H100 host.
  void flush_events();
  // Adds the device counters into expert_totals_ and zeroes them (engine thread). The device
  // counts in F32, exact to 2^24: decode() folds before any counter could get there.
  void fold_expert_counts();
  // Runs `task` on the engine thread between steps and waits for it (rethrowing what it throws);
  // throws when the engine stops first.
  void between_steps(std::function<void()> task);
  void run_tasks();
  // Expert placement (engine thread): adds `heat` (checked with check_heat) to the layers' heat,
  // then copies each layer's hottest experts to its device.
  void add_heat(const std::vector<ExpertLayerCounts>& heat);
  void place();

  llama_model* model_;
  const llama_vocab* vocab_;
  llama_context* ctx_ = nullptr;
  // CPU worker threads kept for the engine's life, as llama-bench and llama-cli attach one;
  // without it ggml creates and joins its threads on every graph compute.
  ggml_threadpool* threadpool_ = nullptr;
  llama_batch batch_{};
  uint32_t n_ctx_seq_ = 0;
  uint32_t n_seq_max_ = 0;
  uint32_t n_batch_ = 0;
  uint32_t max_queue_ = 0;
  bool kv_paged_ = false;
  ggml_type type_k_ = GGML_TYPE_F16;
  ggml_type type_v_ = GGML_TYPE_F16;
  bool moe_group_topk_ = false;
  bool deterministic_ = false;
  bool prompt_cache_ = false;
  // Prefix sharing across slots (KV copied from another sequence's stream): off with the prompt
  // cache, for recurrent or hybrid models (a state is not a prefix of cells), and with MTP drafts.
  bool share_prefix_ = false;
  uint32_t block_ = 1;       // cells per block of the paged pool (1: cells one by one)
  uint32_t pool_cells_ = 0;  // shared KV pool with a budget (kv_unified + kv_budget); 0: none
  uint64_t next_origin_ = 1;  // Slot::Segment origins
  size_t checkpoint_every_ = 0;     // recurrent state copies every this many prompt tokens; 0: none
  size_t max_checkpoints_ = 0;      // per sequence
  uint64_t checkpoint_memory_ = 0;  // all sequences' copies together; 0: no limit
  uint64_t checkpoint_bytes_ = 0;   // what they hold now (stats_.state_checkpoint_bytes, unlocked)
  uint64_t checkpoint_clock_ = 0;
  bool recurrent_ = false;    // the model keeps a recurrent state (recurrent or hybrid)
  uint64_t releases_ = 0;
  std::vector<llama_token_data> scratch_;  // candidates for sampling (engine thread)
  std::vector<std::vector<llama_token_data>> thread_scratch_;  // the same per choose_all thread
  int32_t threads_ = 1;
  Notify notify_;

  std::mutex mu_;  // guards incoming_, cancels_, stop_, outbox_, stats_
  std::condition_variable cv_;
  std::vector<Pending> incoming_;
  std::unordered_set<uint64_t> cancels_;
  std::vector<std::pair<uint64_t, llama_token>> feeds_;
  bool stop_ = false;
  std::vector<Event> outbox_;
  bool notified_ = false;  // the owner was woken and has not drained since
  EngineStats stats_;

  // Owned by the engine thread.
  uint64_t swap_memory_ = 0;              // EngineOptions::kv_swap_memory
  std::atomic<uint64_t> swap_bytes_{0};   // held by Resume::swapped (declared before waiting_)
  std::vector<Pending> waiting_;
  std::vector<Slot> slots_;
  uint64_t next_order_ = 0;
  uint64_t next_admit_ = 0;

  llama_context* draft_ctx_ = nullptr;
  llama_batch draft_batch_{};
  uint32_t draft_max_ = 0;
  bool mtp_ = false;
  int32_t n_embd_ = 0;  // MTP: width of a hidden-state row

  // Expert statistics: layers with counters; totals, folded from the device (engine thread);
  // tokens decoded since the last fold.
  std::vector<int32_t> expert_layers_;
  std::vector<std::vector<uint64_t>> expert_totals_;
  std::vector<float> expert_scratch_;
  uint64_t expert_unfolded_tokens_ = 0;

  // Expert placement: layers with copies, each one's heat (engine thread), the current choice (read
  // under mu_), and tokens decoded since it was made.
  uint32_t gpu_experts_ = 0;
  uint64_t replace_every_ = 0;
  uint64_t replace_tokens_ = 0;
  std::vector<int32_t> place_layers_;
  std::vector<std::vector<double>> place_heat_;
  std::vector<ExpertPlacement> placement_;
  std::string place_error_;

  // between_steps() tasks (under mu_), run at the start of an engine iteration.
  std::vector<std::packaged_task<void()>> tasks_;

  std::atomic<bool> abort_decode_{false};
  std::vector<std::string> rpc_endpoints_;
  std::string broken_;  // why the model cannot run any more (a lost RPC server); engine thread only
  std::thread thread_;
};

}  // namespace genesis
