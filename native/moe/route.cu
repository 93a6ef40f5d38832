// The fused MoE routing kernel (see route.h for what routing is): one warp per token does scores,
// selection bias, group limits, top-k, normalisation and scaling in registers, in one launch, where
// upstream's graph runs a chain of ops (softmax or sigmoid, add, argsort, get_rows, sum_rows,
// argsort, get_rows, fill, set_rows, argsort, get_rows, sum_rows, clamp, div, scale). Any expert
// count up to 1024 (upstream's fused topk-moe kernel takes powers of two only, and no groups).
// Optionally counts, on the device, how often each expert is chosen: no host synchronisation.
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "moe/route.h"

namespace genesis {

namespace {

constexpr int kWarp = 32;
constexpr int kPerLane = kMoeRouteMaxExperts / kWarp;  // experts a lane holds (e = lane + 32 j)
constexpr unsigned kAll = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kAll, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kAll, v, o);
  return v;
}

// The warp's best (value, index): larger value, then smaller index, as the reference breaks ties.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kAll, v, o);
    const int oi = __shfl_xor_sync(kAll, i, o);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

// The two largest of the warp's (a >= b) pairs.
__device__ __forceinline__ void warp_top2(float& a, float& b) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float oa = __shfl_xor_sync(kAll, a, o);
    const float ob = __shfl_xor_sync(kAll, b, o);
    const float hi = fmaxf(a, oa);
    const float lo = fmaxf(fminf(a, oa), fmaxf(b, ob));
    a = hi;
    b = lo;
  }
}

template <bool kSigmoid>
__global__ void __launch_bounds__(128) moe_route_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int n_tokens, int n_expert,
                                                        int k, int n_groups, int n_group_used, bool norm, float scale, int* __restrict__ ids,
                                                        float* __restrict__ weights, unsigned* __restrict__ counts) {
  const int token = blockIdx.x * blockDim.y + threadIdx.y;
  if (token >= n_tokens) return;  // whole warps leave together: blockDim.x is 32
  const int lane = threadIdx.x;
  const float* row = logits + static_cast<size_t>(token) * n_expert;
  const float neg_inf = -INFINITY;

  float prob[kPerLane];
  float sel[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + kWarp * j;
    prob[j] = e < n_expert ? row[e] : neg_inf;
  }
  if (kSigmoid) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) prob[j] = lane + kWarp * j < n_expert ? 1.0f / (1.0f + expf(-prob[j])) : 0.0f;
  } else {
    float mx = neg_inf;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) mx = fmaxf(mx, prob[j]);
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      prob[j] = lane + kWarp * j < n_expert ? expf(prob[j] - mx) : 0.0f;
      sum += prob[j];
    }
    const float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) prob[j] *= inv;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + kWarp * j;
    sel[j] = e < n_expert ? prob[j] + (bias != nullptr ? bias[e] : 0.0f) : neg_inf;
  }

  if (n_groups > 1) {
    // Each group's score is the sum of its two best; lane g keeps group g's.
    const int per = n_expert / n_groups;
    float mine = neg_inf;
    for (int g = 0; g < n_groups; ++g) {
      float a = neg_inf, b = neg_inf;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int e = lane + kWarp * j;
        if (e < n_expert && e / per == g) {
          if (sel[j] > a) {
            b = a;
            a = sel[j];
          } else if (sel[j] > b) {
            b = sel[j];
          }
        }
      }
      warp_top2(a, b);
      if (lane == g) mine = a + b;
    }
    // The n_group_used best groups, ties to the lower group.
    unsigned kept = 0;
    float score = lane < n_groups ? mine : neg_inf;
    for (int r = 0; r < n_group_used; ++r) {
      float v = score;
      int i = lane;
      warp_argmax(v, i);
      kept |= 1u << i;
      if (lane == i) score = neg_inf;
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + kWarp * j;
      if (e < n_expert && !((kept >> (e / per)) & 1u)) sel[j] = neg_inf;
    }
  }

  // Top k by biased score: k rounds of a warp argmax; the winner's lane drops it.
  float chosen_prob = 0.0f;  // lane r keeps the r-th choice's weight
  int chosen_id = 0;
  float total = 0.0f;
  for (int r = 0; r < k; ++r) {
    float v = neg_inf;
    int i = n_expert;  // no expert: loses every tie
    float pv = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + kWarp * j;
      if (e < n_expert && (sel[j] > v || (sel[j] == v && e < i))) {
        v = sel[j];
        i = e;
        pv = prob[j];
      }
    }
    const int own = i;
    warp_argmax(v, i);
    // The winner's unbiased score, from the lane that holds it.
    const int holder = i % kWarp;
    pv = __shfl_sync(kAll, pv, holder);
    if (lane == holder && own == i) {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (lane + kWarp * j == i) sel[j] = neg_inf;
      }
    }
    total += pv;
    if (lane == r) {
      chosen_prob = pv;
      chosen_id = i;
    }
  }
  if (lane < k) {
    const float div = norm ? fmaxf(total, 6.103515625e-5f) : 1.0f;
    ids[static_cast<size_t>(token) * k + lane] = chosen_id;
    weights[static_cast<size_t>(token) * k + lane] = chosen_prob / div * scale;
    if (counts != nullptr) atomicAdd(counts + chosen_id, 1u);
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// Device buffers freed on every path.
struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) { check(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace

void moe_route_launch(const float* logits, const float* bias, int n_tokens, const MoeRouteParams& p, int* ids, float* weights, unsigned* counts,
                      cudaStream_t stream) {
  const dim3 block(kWarp, 4);  // four tokens per block
  const dim3 grid((n_tokens + block.y - 1) / block.y);
  if (p.sigmoid) {
    moe_route_kernel<true><<<grid, block, 0, stream>>>(logits, bias, n_tokens, p.n_expert, p.n_expert_used, p.n_groups, p.n_group_used, p.norm, p.scale,
                                                       ids, weights, counts);
  } else {
    moe_route_kernel<false><<<grid, block, 0, stream>>>(logits, bias, n_tokens, p.n_expert, p.n_expert_used, p.n_groups, p.n_group_used, p.norm, p.scale,
                                                        ids, weights, counts);
  }
}

MoeRouteResult moe_route_fused(const float* logits, int32_t n_tokens, const MoeRouteParams& p, int32_t iterations, std::vector<uint32_t>* counts) {
  moe_route_validate(p, static_cast<size_t>(p.n_expert) * static_cast<size_t>(n_tokens), n_tokens);
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  const size_t n_logits = static_cast<size_t>(p.n_expert) * n_tokens;
  const size_t n_out = static_cast<size_t>(p.n_expert_used) * n_tokens;
  DeviceBuffer d_logits(n_logits * sizeof(float)), d_bias(p.bias.size() * sizeof(float)), d_ids(n_out * sizeof(int)), d_weights(n_out * sizeof(float)),
      d_counts(static_cast<size_t>(p.n_expert) * sizeof(unsigned));
  check(cudaMemcpy(d_logits.p, logits, n_logits * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy logits");
  if (!p.bias.empty()) check(cudaMemcpy(d_bias.p, p.bias.data(), p.bias.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy bias");
  // Poisoned outputs: an element the kernel fails to write shows.
  check(cudaMemset(d_ids.p, 0xff, n_out * sizeof(int)), "cudaMemset");
  check(cudaMemset(d_weights.p, 0xff, n_out * sizeof(float)), "cudaMemset");
  check(cudaMemset(d_counts.p, 0, static_cast<size_t>(p.n_expert) * sizeof(unsigned)), "cudaMemset");
  const float* bias = p.bias.empty() ? nullptr : static_cast<const float*>(d_bias.p);
  moe_route_launch(static_cast<const float*>(d_logits.p), bias, n_tokens, p, static_cast<int*>(d_ids.p), static_cast<float*>(d_weights.p),
                   counts != nullptr ? static_cast<unsigned*>(d_counts.p) : nullptr, nullptr);
  check(cudaGetLastError(), "moe_route_kernel launch");
  check(cudaDeviceSynchronize(), "moe_route_kernel");

  MoeRouteResult out;
  out.device = prop.name;
  out.ids.resize(n_out);
  out.weights.resize(n_out);
  check(cudaMemcpy(out.ids.data(), d_ids.p, n_out * sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy ids");
  check(cudaMemcpy(out.weights.data(), d_weights.p, n_out * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy weights");
  if (counts != nullptr) {
    counts->resize(static_cast<size_t>(p.n_expert));
    check(cudaMemcpy(counts->data(), d_counts.p, counts->size() * sizeof(unsigned), cudaMemcpyDeviceToHost), "cudaMemcpy counts");
  }
  if (iterations > 0) {
    // As moe_route_graph times upstream's chain: each call launched and waited for.
    const auto start = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < iterations; ++i) {
      moe_route_launch(static_cast<const float*>(d_logits.p), bias, n_tokens, p, static_cast<int*>(d_ids.p), static_cast<float*>(d_weights.p), nullptr,
                       nullptr);
      check(cudaDeviceSynchronize(), "moe_route_kernel");
    }
    out.seconds_per_call = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iterations;
    const auto queued = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < iterations; ++i) {
      moe_route_launch(static_cast<const float*>(d_logits.p), bias, n_tokens, p, static_cast<int*>(d_ids.p), static_cast<float*>(d_weights.p), nullptr,
                       nullptr);
    }
    check(cudaGetLastError(), "moe_route_kernel launch");
    check(cudaDeviceSynchronize(), "moe_route_kernel");
    out.seconds_per_call_pipelined = std::chrono::duration<double>(std::chrono::steady_clock::now() - queued).count() / iterations;
  }
  return out;
}

}  // namespace genesis
