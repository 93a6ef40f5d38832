#include "moe/route.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml-cpu.h"
#include "ggml.h"

#ifndef GENESIS_CUDA
#define GENESIS_CUDA 0
#endif

namespace genesis {

namespace {

constexpr float kWeightSumFloor = 6.103515625e-5f;  // upstream's clamp (the smallest F16 normal)

std::string in_range(int64_t lo, int64_t hi) { return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"; }

}  // namespace

void moe_route_validate(const MoeRouteParams& p, size_t n_logits, int32_t n_tokens) {
  if (p.n_expert < 1 || p.n_expert > kMoeRouteMaxExperts) throw MoeRouteError("nExpert", in_range(1, kMoeRouteMaxExperts));
  if (p.n_expert_used < 1 || p.n_expert_used > std::min(p.n_expert, kMoeRouteMaxUsed)) {
    throw MoeRouteError("nExpertUsed", in_range(1, std::min(p.n_expert, kMoeRouteMaxUsed)));
  }
  if (p.n_groups < 1 || p.n_groups > kMoeRouteMaxGroups || p.n_expert % p.n_groups != 0) {
    throw MoeRouteError("nGroups", "a divisor of nExpert (" + std::to_string(p.n_expert) + ") in [1, " + std::to_string(kMoeRouteMaxGroups) + "]");
  }
  if (p.n_groups > 1 && p.n_expert / p.n_groups < 2) throw MoeRouteError("nGroups", "groups of at least 2 experts (each is scored by its best two)");
  if (p.n_group_used < 1 || p.n_group_used > p.n_groups) throw MoeRouteError("nGroupUsed", in_range(1, p.n_groups));
  if (p.n_group_used * (p.n_expert / p.n_groups) < p.n_expert_used) {
    throw MoeRouteError("nGroupUsed", "enough groups to hold nExpertUsed (" + std::to_string(p.n_expert_used) + ") experts");
  }
  if (!p.bias.empty() && p.bias.size() != static_cast<size_t>(p.n_expert)) throw MoeRouteError("bias", "nExpert (" + std::to_string(p.n_expert) + ") values or none");
  if (!std::isfinite(p.scale)) throw MoeRouteError("scale", "a finite number");
  if (n_tokens < 1) throw MoeRouteError("nTokens", "at least 1");
  if (n_logits != static_cast<size_t>(p.n_expert) * static_cast<size_t>(n_tokens)) {
    throw MoeRouteError("logits", "nExpert × nTokens (" + std::to_string(static_cast<int64_t>(p.n_expert) * n_tokens) + ") values");
  }
}

MoeRouteResult moe_route_reference(const float* logits, int32_t n_tokens, const MoeRouteParams& p) {
  moe_route_validate(p, static_cast<size_t>(p.n_expert) * static_cast<size_t>(n_tokens), n_tokens);
  const int32_t n = p.n_expert;
  const int32_t k = p.n_expert_used;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  MoeRouteResult out;
  out.device = "reference";
  out.ids.resize(static_cast<size_t>(n_tokens) * k);
  out.weights.resize(out.ids.size());
  std::vector<float> probs(n), sel(n);
  std::vector<int32_t> order(n);
  for (int32_t t = 0; t < n_tokens; ++t) {
    const float* x = logits + static_cast<size_t>(t) * n;
    if (p.sigmoid) {
      for (int32_t e = 0; e < n; ++e) probs[e] = 1.0f / (1.0f + std::exp(-x[e]));
    } else {
      const float mx = *std::max_element(x, x + n);
      double sum = 0;
      for (int32_t e = 0; e < n; ++e) {
        probs[e] = std::exp(x[e] - mx);
        sum += probs[e];
      }
      const float inv = static_cast<float>(1.0 / sum);
      for (int32_t e = 0; e < n; ++e) probs[e] *= inv;
    }
    for (int32_t e = 0; e < n; ++e) sel[e] = probs[e] + (p.bias.empty() ? 0.0f : p.bias[e]);
    if (p.n_groups > 1) {
      const int32_t per = n / p.n_groups;
      std::vector<float> score(p.n_groups);
      for (int32_t g = 0; g < p.n_groups; ++g) {
        float a = neg_inf, b = neg_inf;  // the two best
        for (int32_t e = g * per; e < (g + 1) * per; ++e) {
          if (sel[e] > a) {
            b = a;
            a = sel[e];
          } else if (sel[e] > b) {
            b = sel[e];
          }
        }
        score[g] = a + b;
      }
      std::vector<int32_t> groups(p.n_groups);
      std::iota(groups.begin(), groups.end(), 0);
      std::stable_sort(groups.begin(), groups.end(), [&](int32_t i, int32_t j) { return score[i] > score[j]; });
      std::vector<bool> kept(p.n_groups, false);
      for (int32_t i = 0; i < p.n_group_used; ++i) kept[groups[i]] = true;
      for (int32_t e = 0; e < n; ++e) {
        if (!kept[e / per]) sel[e] = neg_inf;
      }
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t i, int32_t j) { return sel[i] > sel[j] || (sel[i] == sel[j] && i < j); });
    float sum = 0;
    for (int32_t i = 0; i < k; ++i) sum += probs[order[i]];
    const float div = p.norm ? std::max(sum, kWeightSumFloor) : 1.0f;
    for (int32_t i = 0; i < k; ++i) {
      out.ids[static_cast<size_t>(t) * k + i] = order[i];
      out.weights[static_cast<size_t>(t) * k + i] = probs[order[i]] / div * p.scale;
    }
  }
  return out;
}

MoeRouteResult moe_route_graph(const float* logits, int32_t n_tokens, const MoeRouteParams& p, bool gpu, int32_t iterations, bool group_op) {
  moe_route_validate(p, static_cast<size_t>(p.n_expert) * static_cast<size_t>(n_tokens), n_tokens);
  ggml_backend_dev_t dev = nullptr;
  for (size_t i = 0; i < ggml_backend_dev_count() && dev == nullptr; ++i) {
    ggml_backend_dev_t d = ggml_backend_dev_get(i);
    if (ggml_backend_dev_type(d) == (gpu ? GGML_BACKEND_DEVICE_TYPE_GPU : GGML_BACKEND_DEVICE_TYPE_CPU)) dev = d;
  }
  if (dev == nullptr) throw MoeRouteError("device", gpu ? "'cpu': ggml has no GPU device here" : "a device ggml has");
  ggml_backend_ptr backend(ggml_backend_dev_init(dev, nullptr));
  if (!backend) throw std::runtime_error(std::string("ggml could not initialise ") + ggml_backend_dev_name(dev));

  const int64_t n = p.n_expert;
  const int64_t k = p.n_expert_used;
  ggml_init_params params = {ggml_tensor_overhead() * 64 + ggml_graph_overhead(), nullptr, true};
  ggml_context_ptr owner(ggml_init(params));
  ggml_context* ctx = owner.get();
  ggml_tensor* in = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n_tokens);
  ggml_tensor* bias = p.bias.empty() ? nullptr : ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);

  // The op chain of llama.cpp's build_moe_ffn (llama-graph.cpp), routing part, op for op.
  ggml_tensor* probs = p.sigmoid ? ggml_sigmoid(ctx, in) : ggml_soft_max(ctx, in);  // [n_expert, n_tokens]
  ggml_tensor* selection = bias ? ggml_add(ctx, probs, bias) : probs;
  ggml_tensor* ids = nullptr;
  if (p.n_groups > 1 && group_op) {
    ids = ggml_moe_group_topk(ctx, selection, p.n_groups, p.n_group_used, static_cast<int>(k));  // [k, n_tokens]
  } else if (p.n_groups > 1) {
    const int64_t per = n / p.n_groups;
    ggml_tensor* groups = ggml_reshape_3d(ctx, selection, per, p.n_groups, n_tokens);
    ggml_tensor* scores = ggml_argsort_top_k(ctx, groups, 2);  // [2, n_groups, n_tokens]
    scores = ggml_get_rows(ctx, ggml_reshape_4d(ctx, groups, 1, groups->ne[0], groups->ne[1], groups->ne[2]), scores);
    scores = ggml_sum_rows(ctx, ggml_reshape_3d(ctx, scores, scores->ne[1], scores->ne[2], scores->ne[3]));
    scores = ggml_reshape_2d(ctx, scores, scores->ne[1], scores->ne[2]);  // [n_groups, n_tokens]
    ggml_tensor* kept = ggml_argsort_top_k(ctx, scores, p.n_group_used);
    ggml_tensor* rows = ggml_get_rows(ctx, groups, kept);
    selection = ggml_set_rows(ctx, ggml_fill(ctx, groups, -INFINITY), rows, kept);
    selection = ggml_reshape_2d(ctx, selection, n, n_tokens);
  }
  if (ids == nullptr) ids = ggml_argsort_top_k(ctx, selection, k);  // [k, n_tokens]
  ggml_tensor* weights = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, n, n_tokens), ids);  // [1, k, n_tokens]
  if (p.norm) {
    weights = ggml_reshape_2d(ctx, weights, k, n_tokens);
    ggml_tensor* sum = ggml_clamp(ctx, ggml_sum_rows(ctx, weights), kWeightSumFloor, INFINITY);
    weights = ggml_reshape_3d(ctx, ggml_div(ctx, weights, sum), 1, k, n_tokens);
  }
  if (p.scale != 1.0f) weights = ggml_scale(ctx, weights, p.scale);
  if (!ggml_is_contiguous(ids)) ids = ggml_cont(ctx, ids);  // argsort_top_k is a view of the first k of each sorted row
  ggml_set_output(ids);
  ggml_set_output(weights);
  ggml_cgraph* graph = ggml_new_graph(ctx);
  // The weights first, as build_moe_ffn expands them ("so that topk-moe can be used"): the nodes then
  // come in the order ggml-cuda's top-k MoE fusion matches (gating, reshape, bias, top-k, get_rows,
  // normalisation, scale), so the GPU runs what it runs inside a model.
  ggml_build_forward_expand(graph, weights);
  ggml_build_forward_expand(graph, ids);

  ggml_gallocr_ptr alloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend.get())));
  if (!ggml_gallocr_alloc_graph(alloc.get(), graph)) throw std::runtime_error("could not allocate the routing graph");
  for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) {
    ggml_tensor* node = ggml_graph_node(graph, i);
    if (!ggml_backend_supports_op(backend.get(), node)) {
      throw std::runtime_error(std::string(ggml_backend_dev_name(dev)) + " does not support " + ggml_op_desc(node) + " in the routing graph");
    }
  }
  ggml_backend_tensor_set(in, logits, 0, ggml_nbytes(in));
  if (bias) ggml_backend_tensor_set(bias, p.bias.data(), 0, ggml_nbytes(bias));
  if (ggml_backend_graph_compute(backend.get(), graph) != GGML_STATUS_SUCCESS) throw std::runtime_error("the routing graph failed");

  MoeRouteResult out;
  out.device = ggml_backend_dev_name(dev);
  out.ids.resize(static_cast<size_t>(k) * n_tokens);
  out.weights.resize(out.ids.size());
  ggml_backend_tensor_get(ids, out.ids.data(), 0, ggml_nbytes(ids));
  ggml_backend_tensor_get(weights, out.weights.data(), 0, ggml_nbytes(weights));
  if (iterations > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < iterations; ++i) ggml_backend_graph_compute(backend.get(), graph);
    out.seconds_per_call = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iterations;
    const auto queued = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < iterations; ++i) {
      if (ggml_backend_graph_compute_async(backend.get(), graph) != GGML_STATUS_SUCCESS) throw std::runtime_error("the routing graph failed");
    }
    ggml_backend_synchronize(backend.get());
    out.seconds_per_call_pipelined = std::chrono::duration<double>(std::chrono::steady_clock::now() - queued).count() / iterations;
  }
  return out;
}

#if !GENESIS_CUDA
MoeRouteResult moe_route_fused(const float*, int32_t, const MoeRouteParams&, int32_t, std::vector<uint32_t>*) {
  throw std::runtime_error("the fused routing kernel is CUDA code, and this is the CPU build of the addon (rebuild with GENESIS_CUDA=1)");
}
#endif

}  // namespace genesis
