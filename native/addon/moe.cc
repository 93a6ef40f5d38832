// moeRoute(kind, logits, nTokens, params, options): MoE expert routing three ways (native/moe/route.h)
// for checks and microbenchmarks: the C++ reference, upstream's ggml op chain on the CPU or a GPU,
// and the fused CUDA kernel. Synchronous: a diagnostic, not a serving path.
#include "addon/moe.h"

#include <cmath>

#include "addon/convert.h"
#include "addon/model.h"
#include "moe/route.h"

namespace genesis {

namespace {

int32_t int_param(Napi::Env env, const Napi::Object& o, const char* key, int32_t fallback, bool required) {
  const Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) {
    if (required) invalid_option(env, key, "an integer");
    return fallback;
  }
  const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
  if (!std::isfinite(d) || std::floor(d) != d || std::fabs(d) > 1e9) invalid_option(env, key, "an integer");
  return static_cast<int32_t>(d);
}

MoeRouteParams params_from_js(Napi::Env env, Napi::Value value) {
  if (!value.IsObject()) invalid_option(env, "params", "an object { nExpert, nExpertUsed, nGroups?, nGroupUsed?, scoring?, norm?, scale?, bias? }");
  const Napi::Object o = value.As<Napi::Object>();
  MoeRouteParams p;
  p.n_expert = int_param(env, o, "nExpert", 0, true);
  p.n_expert_used = int_param(env, o, "nExpertUsed", 0, true);
  p.n_groups = int_param(env, o, "nGroups", 1, false);
  p.n_group_used = int_param(env, o, "nGroupUsed", p.n_groups, false);
  const Napi::Value scoring = o.Get("scoring");
  const std::string s = scoring.IsString() ? scoring.As<Napi::String>().Utf8Value() : "";
  if (!scoring.IsUndefined() && s != "softmax" && s != "sigmoid") invalid_option(env, "scoring", "'softmax' or 'sigmoid'");
  p.sigmoid = s == "sigmoid";
  const Napi::Value norm = o.Get("norm");
  if (!norm.IsUndefined() && !norm.IsBoolean()) invalid_option(env, "norm", "a boolean");
  p.norm = norm.IsBoolean() && norm.As<Napi::Boolean>().Value();
  const Napi::Value scale = o.Get("scale");
  if (!scale.IsUndefined() && !scale.IsNumber()) invalid_option(env, "scale", "a finite number");
  p.scale = scale.IsNumber() ? scale.As<Napi::Number>().FloatValue() : 1.0f;
  const Napi::Value bias = o.Get("bias");
  if (!bias.IsUndefined() && !bias.IsNull()) {
    if (!bias.IsTypedArray() || bias.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) invalid_option(env, "bias", "a Float32Array");
    const Napi::Float32Array b = bias.As<Napi::Float32Array>();
    p.bias.assign(b.Data(), b.Data() + b.ElementLength());
  }
  return p;
}

}  // namespace

Napi::Value MoeRoute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string kind = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  if (kind != "reference" && kind != "graph" && kind != "graph-op" && kind != "fused") {
    invalid_option(env, "kind", "'reference', 'graph', 'graph-op' or 'fused'");
  }
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
    invalid_option(env, "logits", "a Float32Array of nExpert × nTokens scores");
  }
  const Napi::Float32Array logits = info[1].As<Napi::Float32Array>();
  const double n_tokens_d = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : NAN;
  if (!std::isfinite(n_tokens_d) || std::floor(n_tokens_d) != n_tokens_d || n_tokens_d < 1 || n_tokens_d > 1 << 20) {
    invalid_option(env, "nTokens", "an integer in [1, 1048576]");
  }
  const int32_t n_tokens = static_cast<int32_t>(n_tokens_d);
  MoeRouteParams p = params_from_js(env, info.Length() > 3 ? info[3] : env.Undefined());
  const Napi::Object o = info.Length() > 4 && info[4].IsObject() ? info[4].As<Napi::Object>() : Napi::Object::New(env);
  const int32_t iterations = int_param(env, o, "iterations", 0, false);
  if (iterations < 0 || iterations > 100000) invalid_option(env, "iterations", "an integer in [0, 100000]");
  const Napi::Value device = o.Get("device");
  const std::string dev = device.IsString() ? device.As<Napi::String>().Utf8Value() : "cpu";
  if (dev != "cpu" && dev != "gpu") invalid_option(env, "device", "'cpu' or 'gpu'");
  const bool want_counts = o.Get("counts").IsBoolean() && o.Get("counts").As<Napi::Boolean>().Value();

  MoeRouteResult r;
  std::vector<uint32_t> counts;
  try {
    moe_route_validate(p, logits.ElementLength(), n_tokens);
    if (kind == "reference") r = moe_route_reference(logits.Data(), n_tokens, p);
    if (kind == "graph" || kind == "graph-op") r = moe_route_graph(logits.Data(), n_tokens, p, dev == "gpu", iterations, kind == "graph-op");
    if (kind == "fused") r = moe_route_fused(logits.Data(), n_tokens, p, iterations, want_counts ? &counts : nullptr);
  } catch (const MoeRouteError& e) {
    invalid_option(env, e.option, e.expected);
  } catch (const std::exception& e) {
    throw CodedError(env, "ENGINE", std::string("moeRoute(") + kind + "): " + e.what());
  }
  Napi::Object out = Napi::Object::New(env);
  Napi::Int32Array ids = Napi::Int32Array::New(env, r.ids.size());
  std::copy(r.ids.begin(), r.ids.end(), ids.Data());
  Napi::Float32Array weights = Napi::Float32Array::New(env, r.weights.size());
  std::copy(r.weights.begin(), r.weights.end(), weights.Data());
  out.Set("ids", ids);
  out.Set("weights", weights);
  out.Set("device", r.device);
  out.Set("secondsPerCall", r.seconds_per_call);
  out.Set("secondsPerCallPipelined", r.seconds_per_call_pipelined);
  if (want_counts && kind == "fused") {
    Napi::Uint32Array c = Napi::Uint32Array::New(env, counts.size());
    std::copy(counts.begin(), counts.end(), c.Data());
    out.Set("counts", c);
  }
  return out;
}

}  // namespace genesis
