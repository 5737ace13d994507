// route: one fused kernel, one thread per token. The per-token arithmetic is the same
// function the CPU op runs (core/routing.h), so both backends choose the same experts.
#include "core/routing.h"
#include "ops/kernels/dtype.cuh"

namespace moe_ep::kernels {
namespace {

constexpr int kRouteThreads = 128;

template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, const float* __restrict__ bias,
                             core::RouteConfig config, int64_t num_tokens,
                             int32_t* __restrict__ topk_ids, float* __restrict__ topk_weights) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_tokens) return;
  const T* row = logits + t * config.num_experts;
  core::route_token([row](int e) { return to_float(row[e]); }, bias, config,
                    topk_ids + t * config.top_k, topk_weights + t * config.top_k);
}

}  // namespace

cudaError_t launch_route(const void* logits, DType dtype, const float* bias,
                         const core::RouteConfig& config, int64_t num_tokens, int32_t* topk_ids,
                         float* topk_weights, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((num_tokens + kRouteThreads - 1) / kRouteThreads);
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    route_kernel<T><<<blocks, kRouteThreads, 0, stream>>>(
        static_cast<const T*>(logits), bias, config, num_tokens, topk_ids, topk_weights);
    return cudaGetLastError();
  });
}

}  // namespace moe_ep::kernels
