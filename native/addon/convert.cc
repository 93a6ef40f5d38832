#include "addon/convert.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "addon/log.h"
#include "addon/model.h"

namespace genesis {

void invalid_option(Napi::Env env, const std::string& option, const std::string& expected) {
  Napi::Error error = CodedError(env, "INVALID_OPTION", "invalid option " + option + ": expected " + expected);
  error.Set("option", Napi::String::New(env, option));
  error.Set("expected", Napi::String::New(env, expected));
  throw error;
}

namespace {

float get_float(Napi::Env env, const Napi::Object& o, const char* key, float fallback) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return fallback;
  if (!v.IsNumber()) invalid_option(env, key, "a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) invalid_option(env, key, "a finite number");
  return static_cast<float>(d);
}

int64_t get_integer(Napi::Env env, const Napi::Object& o, const char* key, int64_t fallback, int64_t min, int64_t max) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return fallback;
  if (!v.IsNumber()) invalid_option(env, key, "an integer");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::floor(d) != d || d < static_cast<double>(min) || d > static_cast<double>(max)) {
    invalid_option(env, key, "an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  }
  return static_cast<int64_t>(d);
}

std::string meta(const llama_model* model, const char* key) {
  char buf[512];
  const int32_t n = llama_model_meta_val_str(model, key, buf, sizeof buf);
  return n < 0 ? std::string() : std::string(buf, static_cast<size_t>(std::min<int32_t>(n, sizeof buf - 1)));
}

}  // namespace

std::vector<llama_token> tokens_from_js(Napi::Env env, Napi::Value value, int32_t n_vocab, const char* what) {
  std::vector<llama_token> tokens;
  auto check = [&](double t, size_t i) {
    // llama.cpp indexes its embedding table with these ids: an out-of-range id would read out of bounds.
    if (!(t >= 0 && t < n_vocab) || std::floor(t) != t) {
      throw CodedError(env, "INVALID_OPTION", std::string("invalid token id in ") + what + "[" + std::to_string(i) + "]: expected an integer in [0, " +
                                                  std::to_string(n_vocab) + "), got " + std::to_string(t));
    }
    tokens.push_back(static_cast<llama_token>(t));
  };
  if (value.IsTypedArray() && value.As<Napi::TypedArray>().TypedArrayType() == napi_int32_array) {
    Napi::Int32Array a = value.As<Napi::Int32Array>();
    tokens.reserve(a.ElementLength());
    for (size_t i = 0; i < a.ElementLength(); ++i) check(a[i], i);
  } else if (value.IsArray()) {
    Napi::Array a = value.As<Napi::Array>();
    tokens.reserve(a.Length());
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value v = a.Get(i);
      if (!v.IsNumber()) throw CodedError(env, "INVALID_OPTION", std::string(what) + "[" + std::to_string(i) + "]: expected a token id (number)");
      check(v.As<Napi::Number>().DoubleValue(), i);
    }
  } else {
    throw CodedError(env, "INVALID_OPTION", std::string(what) + ": expected an Int32Array or an array of token ids");
  }
  return tokens;
}

Request request_from_js(Napi::Env env, Napi::Value id, Napi::Value prompt, Napi::Object o, int32_t n_vocab) {
  Request r;
  r.id = static_cast<uint64_t>(id.As<Napi::Number>().Int64Value());
  r.prompt = tokens_from_js(env, prompt, n_vocab, "prompt");
  SamplingParams& s = r.sampling;
  s.temperature = get_float(env, o, "temperature", s.temperature);
  s.top_k = static_cast<int32_t>(get_integer(env, o, "topK", s.top_k, 0, n_vocab));
  s.top_p = get_float(env, o, "topP", s.top_p);
  s.min_p = get_float(env, o, "minP", s.min_p);
  s.penalty_last_n = static_cast<int32_t>(get_integer(env, o, "penaltyLastN", s.penalty_last_n, -1, INT32_MAX));
  s.repeat_penalty = get_float(env, o, "repeatPenalty", s.repeat_penalty);
  s.frequency_penalty = get_float(env, o, "frequencyPenalty", s.frequency_penalty);
  s.presence_penalty = get_float(env, o, "presencePenalty", s.presence_penalty);
  s.seed = static_cast<uint32_t>(get_integer(env, o, "seed", 0, 0, UINT32_MAX));
  if (s.top_p < 0 || s.top_p > 1) invalid_option(env, "topP", "a number in [0, 1]");
  if (s.min_p < 0 || s.min_p > 1) invalid_option(env, "minP", "a number in [0, 1]");
  if (s.repeat_penalty <= 0) invalid_option(env, "repeatPenalty", "a number > 0");

  Napi::Value bias = o.Get("logitBias");
  if (bias.IsArray()) {
    Napi::Array pairs = bias.As<Napi::Array>();
    for (uint32_t i = 0; i < pairs.Length(); ++i) {
      Napi::Value pair = pairs.Get(i);
      if (!pair.IsArray() || pair.As<Napi::Array>().Length() != 2) invalid_option(env, "logitBias", "an array of [tokenId, bias] pairs");
      Napi::Array p = pair.As<Napi::Array>();
      if (!p.Get(0u).IsNumber() || !p.Get(1u).IsNumber()) invalid_option(env, "logitBias", "numeric [tokenId, bias] pairs");
      const double token = p.Get(0u).As<Napi::Number>().DoubleValue();
      const double value = p.Get(1u).As<Napi::Number>().DoubleValue();
      if (!(token >= 0 && token < n_vocab) || std::floor(token) != token) {
        invalid_option(env, "logitBias", "token ids in [0, " + std::to_string(n_vocab) + ")");
      }
      // -Infinity bans a token; +Infinity is meaningless, NaN is a mistake.
      if (std::isnan(value) || value == INFINITY) invalid_option(env, "logitBias", "finite biases or -Infinity");
      s.logit_bias.push_back({static_cast<llama_token>(token), static_cast<float>(value)});
    }
  } else if (!bias.IsUndefined() && !bias.IsNull()) {
    invalid_option(env, "logitBias", "an array of [tokenId, bias] pairs");
  }

  Napi::Value grammar = o.Get("grammar");
  if (grammar.IsString()) {
    s.grammar = grammar.As<Napi::String>().Utf8Value();
  } else if (!grammar.IsUndefined() && !grammar.IsNull()) {
    invalid_option(env, "grammar", "a GBNF grammar string");
  }
  r.max_tokens = static_cast<int32_t>(get_integer(env, o, "maxTokens", -1, -1, INT32_MAX));
  r.priority = static_cast<int32_t>(get_integer(env, o, "priority", 0, INT32_MIN, INT32_MAX));
  r.draft_max = static_cast<int32_t>(get_integer(env, o, "draftMaxTokens", -1, -1, 256));
  Napi::Value external = o.Get("externalSampling");
  r.external_sampling = external.IsBoolean() && external.As<Napi::Boolean>().Value();
  Napi::Value ignore_eos = o.Get("ignoreEos");
  r.ignore_eos = ignore_eos.IsBoolean() && ignore_eos.As<Napi::Boolean>().Value();
  Napi::Value stop = o.Get("stop");
  if (stop.IsArray()) {
    Napi::Array a = stop.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value v = a.Get(i);
      if (!v.IsString()) invalid_option(env, "stop", "an array of strings");
      r.stop.push_back(v.As<Napi::String>().Utf8Value());
    }
  } else if (!stop.IsUndefined() && !stop.IsNull()) {
    invalid_option(env, "stop", "an array of strings");
  }
  return r;
}

void check_grammar(Napi::Env env, const llama_vocab* vocab, const std::string& grammar) {
  if (grammar.empty()) return;
  LogCapture capture;
  llama_sampler* sampler = llama_sampler_init_grammar(vocab, grammar.c_str(), "root");
  if (sampler == nullptr) {
    std::string reason = capture.text();
    while (!reason.empty() && (reason.back() == '\n' || reason.back() == ' ')) reason.pop_back();
    std::replace(reason.begin(), reason.end(), '\n', ' ');
    invalid_option(env, "grammar", "a GBNF grammar with a root rule (llama.cpp: " + (reason.empty() ? std::string("it does not parse") : reason) + ")");
  }
  llama_sampler_free(sampler);
}

Napi::Array events_to_js(Napi::Env env, const std::vector<Event>& events) {
  Napi::Array out = Napi::Array::New(env, events.size());
  for (size_t i = 0; i < events.size(); ++i) {
    const Event& e = events[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("id", Napi::Number::New(env, static_cast<double>(e.id)));
    auto tokens = Napi::Int32Array::New(env, e.tokens.size());
    std::copy(e.tokens.begin(), e.tokens.end(), tokens.Data());
    o.Set("tokens", tokens);
    // V8 replaces invalid UTF-8 (only possible in the final flush) with U+FFFD.
    o.Set("text", Napi::String::New(env, e.text));
    switch (e.kind) {
      case Event::Kind::Tokens:
        o.Set("kind", "tokens");
        break;
      case Event::Kind::Done: {
        o.Set("kind", "done");
        o.Set("finishReason", e.finish_reason);
        o.Set("promptTokens", e.prompt_tokens);
        o.Set("completionTokens", e.completion_tokens);
        o.Set("draftTokens", e.draft_tokens);
        o.Set("draftAccepted", e.draft_accepted);
        o.Set("preemptions", e.preemptions);
        Napi::Object t = Napi::Object::New(env);
        t.Set("queuedMs", e.timings.queued_ms);
        t.Set("promptMs", e.timings.prompt_ms);
        t.Set("generationMs", e.timings.generation_ms);
        t.Set("timeToFirstTokenMs", e.timings.time_to_first_token_ms);
        o.Set("timings", t);
        break;
      }
      case Event::Kind::Logits: {
        o.Set("kind", "logits");
        auto logits = Napi::Float32Array::New(env, e.logits.size());
        std::copy(e.logits.begin(), e.logits.end(), logits.Data());
        o.Set("logits", logits);
        break;
      }
      case Event::Kind::Error:
        o.Set("kind", "error");
        o.Set("code", e.error_code);
        o.Set("message", e.error_message);
        o.Set("completionTokens", e.completion_tokens);
        break;
    }
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

Napi::Array devices_to_js(Napi::Env env, const std::vector<DeviceMemory>& devices) {
  Napi::Array out = Napi::Array::New(env, devices.size());
  for (size_t i = 0; i < devices.size(); ++i) {
    const DeviceMemory& d = devices[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", d.name);
    o.Set("description", d.description);
    o.Set("kind", d.kind);
    o.Set("host", d.host);
    o.Set("model", static_cast<double>(d.model));
    o.Set("context", static_cast<double>(d.context));
    o.Set("compute", static_cast<double>(d.compute));
    o.Set("free", static_cast<double>(d.free));
    o.Set("total", static_cast<double>(d.total));
    Napi::Array layers = Napi::Array::New(env, d.layers.size());
    for (size_t k = 0; k < d.layers.size(); ++k) layers.Set(static_cast<uint32_t>(k), d.layers[k]);
    o.Set("layers", layers);
    o.Set("output", d.output);
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

Napi::Object model_info(Napi::Env env, const llama_model* model, const Engine& engine) {
  const llama_vocab* vocab = llama_model_get_vocab(model);
  Napi::Object o = Napi::Object::New(env);
  const std::string arch = meta(model, "general.architecture");
  o.Set("architecture", arch);
  o.Set("name", meta(model, "general.name"));
  char desc[256];
  llama_model_desc(model, desc, sizeof desc);
  o.Set("description", std::string(desc));
  o.Set("parameters", static_cast<double>(llama_model_n_params(model)));
  o.Set("sizeBytes", static_cast<double>(llama_model_size(model)));
  o.Set("fileType", std::string(llama_ftype_name(llama_model_ftype(model))));
  o.Set("embeddingLength", llama_model_n_embd(model));
  o.Set("layers", llama_model_n_layer(model));
  o.Set("heads", llama_model_n_head(model));
  o.Set("kvHeads", llama_model_n_head_kv(model));
  o.Set("trainContextLength", llama_model_n_ctx_train(model));
  o.Set("vocabSize", llama_vocab_n_tokens(vocab));
  const std::string experts = meta(model, (arch + ".expert_count").c_str());
  const std::string used = meta(model, (arch + ".expert_used_count").c_str());
  o.Set("experts", static_cast<double>(std::strtol(experts.c_str(), nullptr, 10)));
  o.Set("expertsUsed", static_cast<double>(std::strtol(used.c_str(), nullptr, 10)));
  o.Set("recurrent", llama_model_is_recurrent(model));
  o.Set("hybrid", llama_model_is_hybrid(model));
  const char* tmpl = llama_model_chat_template(model, nullptr);
  o.Set("chatTemplate", tmpl == nullptr ? env.Null() : Napi::String::New(env, tmpl));
  Napi::Object tokens = Napi::Object::New(env);
  tokens.Set("bos", llama_vocab_bos(vocab));
  tokens.Set("eos", llama_vocab_eos(vocab));
  tokens.Set("eot", llama_vocab_eot(vocab));
  tokens.Set("addBos", llama_vocab_get_add_bos(vocab));
  o.Set("specialTokens", tokens);
  Napi::Object context = Napi::Object::New(env);
  context.Set("contextSize", engine.context_size());
  context.Set("maxSequences", engine.max_sequences());
  context.Set("batchSize", engine.batch_size());
  context.Set("totalContext", engine.total_context());
  context.Set("maxQueue", engine.max_queue());
  context.Set("expertStats", engine.expert_stats());
  context.Set("kvPaged", engine.kv_paged());
  context.Set("kvBlockSize", engine.kv_block_size());
  Napi::Object kv_type = Napi::Object::New(env);
  kv_type.Set("k", ggml_type_name(engine.type_k()));
  kv_type.Set("v", ggml_type_name(engine.type_v()));
  context.Set("kvCacheType", kv_type);
  context.Set("fusedMoeRouting", engine.moe_group_topk());
  context.Set("expertPlacement", engine.expert_placement_on());
  o.Set("context", context);
  Napi::Object metadata = Napi::Object::New(env);
  const int32_t count = llama_model_meta_count(model);
  for (int32_t i = 0; i < count; ++i) {
    char key[256];
    if (llama_model_meta_key_by_index(model, i, key, sizeof key) < 0) continue;
    std::string k(key);
    if (k.rfind("tokenizer.ggml.", 0) == 0) continue;  // vocab arrays: huge and summarised above
    char val[1024];
    const int32_t n = llama_model_meta_val_str_by_index(model, i, val, sizeof val);
    if (n >= 0) metadata.Set(k, std::string(val, static_cast<size_t>(std::min<int32_t>(n, sizeof val - 1))));
  }
  o.Set("metadata", metadata);
  return o;
}

}  // namespace genesis
