// MoE expert routing: which experts each token goes to, and with what weights.
//
// The shape upstream llama.cpp builds from a chain of graph ops in build_moe_ffn (llama-graph.cpp):
// softmax or sigmoid scores; an optional selection bias (DeepSeek-V3's e_score_correction) added for
// the choice only; optionally group-limited: experts in n_groups equal groups, each group scored by
// the sum of its two best biased scores, all but the n_group_used best groups masked out; then the
// top n_expert_used experts by biased score; their unbiased scores as weights, optionally normalised
// to sum 1 (the sum clamped at 6.1e-5 as upstream does) and scaled.
//
//   moe_route_reference   plain C++, the definition (one token at a time, no ggml)
//   moe_route_graph       upstream's op chain, built with ggml ops on the CPU or a GPU backend, as
//                         the reference the fused kernel is checked and timed against
//   moe_route_fused       the fused CUDA kernel (route.cu; CUDA builds only)
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace genesis {

struct MoeRouteParams {
  int32_t n_expert = 0;
  int32_t n_expert_used = 0;
  int32_t n_groups = 1;      // 1: no group limit
  int32_t n_group_used = 1;
  bool sigmoid = false;      // false: softmax over the experts
  bool norm = false;         // weights divided by their sum
  float scale = 1.0f;        // weights multiplied by this (routed_scaling_factor)
  std::vector<float> bias;   // empty, or n_expert selection biases
};

struct MoeRouteResult {
  std::vector<int32_t> ids;     // n_tokens × n_expert_used, best first
  std::vector<float> weights;   // the same layout
  double seconds_per_call = 0;  // moe_route_graph / moe_route_fused with iterations > 0: each call waited for
  double seconds_per_call_pipelined = 0;  // the same calls queued back to back, one wait at the end
  std::string device;           // where it ran
};

// A bad shape or parameter: names the parameter and what it should be.
class MoeRouteError : public std::runtime_error {
 public:
  MoeRouteError(std::string option, std::string expected)
      : std::runtime_error("invalid option " + option + ": expected " + expected), option(std::move(option)), expected(std::move(expected)) {}
  std::string option;
  std::string expected;
};

// Throws MoeRouteError unless the parameters describe a routing the kernels support.
void moe_route_validate(const MoeRouteParams& p, size_t n_logits, int32_t n_tokens);

MoeRouteResult moe_route_reference(const float* logits, int32_t n_tokens, const MoeRouteParams& p);

// gpu: the first GPU backend (throws when there is none); iterations > 0: also times that many
// graph computes after one warm-up and reports the mean, each waited for, and queued back to back
// (as inside a decode step, where the host does not wait between ops).
// group_op: with expert groups, ggml_moe_group_topk (native/patches/0005-moe-group-topk.patch) in
// place of the chain's group limit and top-k, as build_moe_ffn with moe_group_topk.
MoeRouteResult moe_route_graph(const float* logits, int32_t n_tokens, const MoeRouteParams& p, bool gpu, int32_t iterations, bool group_op = false);

// The fused CUDA kernel; counts (optional, n_expert) accumulates how often each expert was chosen,
// on the device. Throws std::runtime_error on the CPU build or a CUDA error.
MoeRouteResult moe_route_fused(const float* logits, int32_t n_tokens, const MoeRouteParams& p, int32_t iterations, std::vector<uint32_t>* counts);

// Largest expert count and top-k the fused kernel handles (one warp per token, 32 experts a lane).
constexpr int32_t kMoeRouteMaxExperts = 1024;
constexpr int32_t kMoeRouteMaxUsed = 32;
constexpr int32_t kMoeRouteMaxGroups = 32;

}  // namespace genesis
