// Per-sequence sampling: one llama.cpp sampler chain per sequence, built from plain parameters.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

namespace genesis {

struct SamplingParams {
  float temperature = 0.8f;  // <= 0: greedy (argmax), the other samplers are skipped
  int32_t top_k = 40;        // <= 0: off
  float top_p = 0.95f;       // >= 1: off
  float min_p = 0.05f;       // <= 0: off
  int32_t penalty_last_n = 64;
  float repeat_penalty = 1.0f;     // 1: off
  float frequency_penalty = 0.0f;  // 0: off
  float presence_penalty = 0.0f;   // 0: off
  std::vector<llama_logit_bias> logit_bias;
  uint32_t seed = 0;
  std::string grammar;  // GBNF; empty: unconstrained
};

struct SamplerDeleter {
  void operator()(llama_sampler* s) const { llama_sampler_free(s); }
};
using SamplerPtr = std::unique_ptr<llama_sampler, SamplerDeleter>;

// Chain order: grammar (masks what the grammar forbids), bias, penalties, truncation, temperature,
// draw, as llama.cpp's common sampler. Returns null when the grammar does not parse.
SamplerPtr make_sampler_chain(const llama_vocab* vocab, const SamplingParams& params);

// Applies the chain to a sequence's logits and accepts the chosen token. Throws std::runtime_error
// when nothing is allowed (a grammar that no token can continue): accepting such a token would make
// llama.cpp's grammar abort the process.
llama_token sample_token(llama_sampler* chain, const float* logits, int32_t n_vocab, std::vector<llama_token_data>& scratch);

bool uses_penalties(const SamplingParams& params);

// Plain greedy (no bias, no penalties): the token is the argmax of the logits, which needs no
// candidate array of n_vocab entries per sequence and step.
bool is_plain_greedy(const SamplingParams& params);

// First index of the largest logit: the same choice as llama.cpp's greedy sampler.
llama_token argmax(const float* logits, int32_t n);

}  // namespace genesis
