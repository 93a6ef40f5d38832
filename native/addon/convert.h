// Conversions between JS values and the engine's plain C++ structs. Everything a request needs is
// copied here, on the JS thread, before it reaches the engine thread.
#pragma once

#include <napi.h>

#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/memory.h"

namespace genesis {

// Throws an INVALID_OPTION error naming the option and what it expects.
[[noreturn]] void invalid_option(Napi::Env env, const std::string& option, const std::string& expected);
std::vector<llama_token> tokens_from_js(Napi::Env env, Napi::Value value, int32_t n_vocab, const char* what);
Request request_from_js(Napi::Env env, Napi::Value id, Napi::Value prompt, Napi::Object options, int32_t n_vocab);
// Parses a GBNF grammar once on the JS thread so a bad one is an INVALID_OPTION error at submit.
void check_grammar(Napi::Env env, const llama_vocab* vocab, const std::string& grammar);
Napi::Array events_to_js(Napi::Env env, const std::vector<Event>& events);
Napi::Object model_info(Napi::Env env, const llama_model* model, const Engine& engine);
// Per-device memory and placement (estimateMemory's devices, model.info.placement.devices).
Napi::Array devices_to_js(Napi::Env env, const std::vector<DeviceMemory>& devices);

}  // namespace genesis
