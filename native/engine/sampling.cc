#include "engine/sampling.h"

#include <cmath>
#include <stdexcept>

namespace genesis {

bool uses_penalties(const SamplingParams& p) {
  return p.penalty_last_n != 0 && (p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f);
}

bool is_plain_greedy(const SamplingParams& p) {
  return p.temperature <= 0.0f && p.logit_bias.empty() && p.grammar.empty() && !uses_penalties(p);
}

llama_token argmax(const float* logits, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
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
