// startRpcServer: llama.cpp's RPC server in this process (genesis rpc-server).
#pragma once

#include <napi.h>

namespace genesis {

Napi::Value StartRpcServer(const Napi::CallbackInfo& info);

}  // namespace genesis
