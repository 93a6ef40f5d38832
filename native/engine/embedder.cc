#include "engine/embedder.h"

#include <cmath>
#include <stdexcept>

namespace genesis {

Embedder::Embedder(llama_model* model, uint32_t context_size, int32_t threads)
    : model_(model), n_ctx_(context_size), threads_(threads) {
  ctx_ = create(LLAMA_POOLING_TYPE_UNSPECIFIED);
  // A generative model has no pooling of its own: its last token has seen the whole input.
  if (ctx_ != nullptr && llama_pooling_type(ctx_) == LLAMA_POOLING_TYPE_NONE) {
    llama_free(ctx_);
    ctx_ = create(LLAMA_POOLING_TYPE_LAST);
  }
  if (ctx_ == nullptr) throw std::runtime_error("llama.cpp could not create an embedding context");
  pooling_ = llama_pooling_type(ctx_);
}

Embedder::~Embedder() {
  if (ctx_ != nullptr) llama_free(ctx_);
}

llama_context* Embedder::create(enum llama_pooling_type pooling) const {
  auto params = llama_context_default_params();
  params.n_ctx = n_ctx_;
  // Pooled embeddings need every token of an input in one micro-batch.
  params.n_batch = n_ctx_;
  params.n_ubatch = n_ctx_;
  params.n_seq_max = 1;
  params.embeddings = true;
  params.pooling_type = pooling;
  params.n_threads = threads_;
  params.n_threads_batch = threads_;
  params.no_perf = true;
  return llama_init_from_model(model_, params);
}

const char* Embedder::pooling() const {
  switch (pooling_) {
    case LLAMA_POOLING_TYPE_MEAN: return "mean";
    case LLAMA_POOLING_TYPE_CLS: return "cls";
    case LLAMA_POOLING_TYPE_LAST: return "last";
    case LLAMA_POOLING_TYPE_RANK: return "rank";
    default: return "none";
  }
}

std::vector<std::vector<float>> Embedder::embed(const std::vector<std::vector<llama_token>>& inputs) {
  std::lock_guard<std::mutex> lock(mu_);
  const int32_t n_embd = llama_model_n_embd_out(model_);
  const bool encoder_only = llama_model_has_encoder(model_) && !llama_model_has_decoder(model_);
  std::vector<std::vector<float>> out;
  out.reserve(inputs.size());
  llama_batch batch = llama_batch_init(static_cast<int32_t>(n_ctx_), 0, 1);
  try {
    for (const auto& tokens : inputs) {
      if (tokens.empty() || tokens.size() > n_ctx_) throw std::runtime_error("input length out of range");
      llama_memory_clear(llama_get_memory(ctx_), true);
      batch.n_tokens = 0;
      for (size_t i = 0; i < tokens.size(); ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = static_cast<llama_pos>(i);
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
        batch.n_tokens++;
      }
      const int32_t status = encoder_only ? llama_encode(ctx_, batch) : llama_decode(ctx_, batch);
      if (status != 0) throw std::runtime_error("llama.cpp failed to compute the embedding (status " + std::to_string(status) + ")");
      const float* pooled = llama_get_embeddings_seq(ctx_, 0);
      if (pooled == nullptr) throw std::runtime_error("llama.cpp returned no pooled embedding");
      std::vector<float> v(pooled, pooled + n_embd);
      double norm = 0;
      for (float x : v) norm += static_cast<double>(x) * x;
      norm = std::sqrt(norm);
      if (norm > 0) {
        for (float& x : v) x = static_cast<float>(x / norm);
      }
      out.push_back(std::move(v));
    }
  } catch (...) {
    llama_batch_free(batch);
    throw;
  }
  llama_batch_free(batch);
  return out;
}

}  // namespace genesis
