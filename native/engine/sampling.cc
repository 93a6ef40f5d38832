#include "engine/sampling.h"

#include <cstring>

#include <cmath>
#include <limits>
#include <stdexcept>

namespace genesis {

bool uses_penalties(const SamplingParams& p) {
  return p.penalty_last_n != 0 && (p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f);
}

bool is_plain_greedy(const SamplingParams& p) {
  return p.temperature <= 0.0f && p.logit_bias.empty() && p.grammar.empty() && !uses_penalties(p);
}

namespace {

llama_token argmax_scalar(const float* logits, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

}  // namespace

llama_token argmax(const float* logits, int32_t n) {
  // One pass in 4-wide vectors (GCC/Clang vector extensions: SSE2 on any x86-64, NEON on Arm),
  // two accumulators, each lane keeping its largest value and where it first saw it; then the lanes
  // are merged, ties going to the lowest id as in the scalar loop. The scalar loop's dependence on
  // logits[best] kept it at one element per cycle: about 0.1 ms over a 150k vocabulary, per
  // sequence and step.
  typedef float f32x4 __attribute__((vector_size(16)));
  typedef int32_t i32x4 __attribute__((vector_size(16)));
  constexpr int32_t kLanes = 4;
  // The scalar loop's answers at the edges: NaN is never greater, so a NaN at 0 wins and other
  // NaNs are skipped; all -inf gives 0.
  if (n < 4 * kLanes || logits[0] != logits[0]) return argmax_scalar(logits, n);
  const float lowest = -std::numeric_limits<float>::infinity();
  f32x4 m0 = {lowest, lowest, lowest, lowest};
  f32x4 m1 = m0;
  i32x4 at0 = {0, 1, 2, 3};
  i32x4 at1 = at0 + kLanes;
  i32x4 cur0 = at0;
  i32x4 cur1 = at1;
  int32_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    f32x4 x0, x1;
    std::memcpy(&x0, logits + i, sizeof x0);
    std::memcpy(&x1, logits + i + kLanes, sizeof x1);
    const i32x4 up0 = x0 > m0;
    const i32x4 up1 = x1 > m1;
    m0 = up0 ? x0 : m0;
    m1 = up1 ? x1 : m1;
    at0 = up0 ? cur0 : at0;
    at1 = up1 ? cur1 : at1;
    cur0 += 2 * kLanes;
    cur1 += 2 * kLanes;
  }
  float best = m0[0];
  int32_t where = at0[0];
  auto take = [&](float v, int32_t k) {
    if (v > best || (v == best && k < where)) {
      best = v;
      where = k;
    }
  };
  for (int32_t j = 1; j < kLanes; ++j) take(m0[j], at0[j]);
  for (int32_t j = 0; j < kLanes; ++j) take(m1[j], at1[j]);
  for (; i < n; ++i) take(logits[i], i);
  return where;
}

SamplerPtr make_sampler_chain(const llama_vocab* vocab, const SamplingParams& p) {
  auto chain_params = llama_sampler_chain_default_params();
  chain_params.no_perf = true;
  SamplerPtr chain(llama_sampler_chain_init(chain_params));
  const int32_t n_vocab = llama_vocab_n_tokens(vocab);

  if (!p.grammar.empty()) {
    llama_sampler* grammar = llama_sampler_init_grammar(vocab, p.grammar.c_str(), "root");
    if (grammar == nullptr) return nullptr;
    llama_sampler_chain_add(chain.get(), grammar);
  }
  if (!p.logit_bias.empty()) {
    llama_sampler_chain_add(chain.get(), llama_sampler_init_logit_bias(n_vocab, static_cast<int32_t>(p.logit_bias.size()), p.logit_bias.data()));
  }
  if (uses_penalties(p)) {
    llama_sampler_chain_add(chain.get(), llama_sampler_init_penalties(n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty));
  }
  if (p.temperature <= 0.0f) {
    llama_sampler_chain_add(chain.get(), llama_sampler_init_greedy());
    return chain;
  }
  if (p.top_k > 0) llama_sampler_chain_add(chain.get(), llama_sampler_init_top_k(p.top_k));
  if (p.top_p < 1.0f) llama_sampler_chain_add(chain.get(), llama_sampler_init_top_p(p.top_p, 1));
  if (p.min_p > 0.0f) llama_sampler_chain_add(chain.get(), llama_sampler_init_min_p(p.min_p, 1));
  llama_sampler_chain_add(chain.get(), llama_sampler_init_temp(p.temperature));
  llama_sampler_chain_add(chain.get(), llama_sampler_init_dist(p.seed));
  return chain;
}

}  // namespace genesis

namespace genesis {

llama_token sample_token(llama_sampler* chain, const float* logits, int32_t n_vocab, std::vector<llama_token_data>& cur) {
  cur.resize(static_cast<size_t>(n_vocab));
  for (int32_t i = 0; i < n_vocab; ++i) cur[i] = llama_token_data{i, logits[i], 0.0f};
  llama_token_data_array array = {cur.data(), cur.size(), -1, false};
  llama_sampler_apply(chain, &array);
  if (array.selected < 0 || static_cast<size_t>(array.selected) >= array.size) {
    throw std::runtime_error("the sampler chain selected no token");
  }
  const llama_token_data& chosen = array.data[array.selected];
  if (std::isinf(chosen.logit) && chosen.logit < 0) {
    throw std::runtime_error("no token is allowed here (the grammar cannot be continued by any token of the vocabulary)");
  }
  llama_sampler_accept(chain, chosen.id);
  return chosen.id;
}

}  // namespace genesis
