// Sentence embeddings: one llama context with embeddings on, separate from the generation engine
// so embedding requests never disturb the batching loop. Each input is one sequence, pooled by the
// model's own pooling type (mean/CLS for embedding models) or, for generative decoders without one,
// by the last token; vectors are L2-normalised as OpenAI's embeddings are.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "llama.h"

namespace genesis {

class Embedder {
 public:
  // Throws std::runtime_error when llama.cpp cannot create the context.
  Embedder(llama_model* model, uint32_t context_size, int32_t threads);
  ~Embedder();

  Embedder(const Embedder&) = delete;
  Embedder& operator=(const Embedder&) = delete;

  uint32_t context_size() const { return n_ctx_; }
  const char* pooling() const;

  // Thread-safe (one computation at a time). Throws std::runtime_error on a llama.cpp failure.
  std::vector<std::vector<float>> embed(const std::vector<std::vector<llama_token>>& inputs);

 private:
  llama_context* create(enum llama_pooling_type pooling) const;

  llama_model* model_;
  llama_context* ctx_ = nullptr;
  uint32_t n_ctx_ = 0;
  int32_t threads_ = 1;
  enum llama_pooling_type pooling_ = LLAMA_POOLING_TYPE_UNSPECIFIED;
  std::mutex mu_;
};

}  // namespace genesis
