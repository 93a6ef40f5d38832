// moeRoute(): MoE routing checks and microbenchmarks (native/moe/route.h).
#pragma once

#include <napi.h>

namespace genesis {

Napi::Value MoeRoute(const Napi::CallbackInfo& info);

}  // namespace genesis
