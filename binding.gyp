{
  # The addon links llama.cpp's static libraries built by scripts/llama.mjs (CMake).
  # scripts/build.mjs passes llama_build (the CMake build folder) and genesis_cuda.
  "variables": {
    "llama_build%": "deps/llama.cpp/build-cpu",
    "genesis_cuda%": 0,
    "cuda_lib_dirs%": ""
  },
  "targets": [
    {
      "target_name": "genesis",
      "sources": [
        "native/addon/addon.cc",
        "native/addon/convert.cc",
        "native/addon/log.cc",
        "native/addon/model.cc",
        "native/addon/moe.cc",
        "native/addon/rpc.cc",
        "native/engine/bandwidth.cc",
        "native/engine/embedder.cc",
        "native/engine/engine.cc",
        "native/engine/memory.cc",
        "native/engine/sampling.cc",
        "native/engine/text.cc",
        "native/moe/route.cc"
      ],
      "include_dirs": [
        "<!@(node -p \"require('node-addon-api').include\")",
        "native",
        "deps/llama.cpp/include",
        "deps/llama.cpp/src",
        "deps/llama.cpp/ggml/include"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NAPI_CPP_EXCEPTIONS",
        "NODE_ADDON_API_CPP_EXCEPTIONS_ALL",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
        "GENESIS_CUDA=<(genesis_cuda)"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "libraries": [
        "<(module_root_dir)/<(llama_build)/src/libllama.a",
        "<(module_root_dir)/<(llama_build)/ggml/src/libggml.a",
        "<(module_root_dir)/<(llama_build)/ggml/src/ggml-rpc/libggml-rpc.a"
      ],
      "conditions": [
        ["genesis_cuda==1", {
          "libraries": [
            "<(module_root_dir)/<(llama_build)/ggml/src/ggml-cuda/libggml-cuda.a",
            "<(module_root_dir)/<(llama_build)/genesis-moe/libgenesis-moe-cuda.a",
            "<(module_root_dir)/<(llama_build)/ggml/src/libggml-cpu.a",
            "<(module_root_dir)/<(llama_build)/ggml/src/libggml-base.a",
            "<@(cuda_lib_dirs)",
            "-lcudart", "-lcublas", "-lcublasLt", "-lcuda"
          ]
        }, {
          "libraries": [
            "<(module_root_dir)/<(llama_build)/ggml/src/libggml-cpu.a",
            "<(module_root_dir)/<(llama_build)/ggml/src/libggml-base.a"
          ]
        }],
        ["OS=='linux'", {
          "cflags_cc": ["-fopenmp"],
          "libraries": ["-fopenmp", "-lpthread", "-ldl"],
          "ldflags": ["-Wl,--exclude-libs,ALL"]
        }]
      ]
    }
  ]
}
