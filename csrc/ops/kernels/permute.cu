// permute / unpermute kernels: the row copies and the weighted combine, bandwidth-bound, with
// 16-byte accesses where the row size and alignment allow. The grouping itself is the
// counting sort of counting_sort.cu.
#include "ops/kernels/dtype.cuh"

namespace moe_ep::kernels {
namespace {

constexpr int kRowThreads = 128;

// One block per token: read its row once, write it to each of its k rows.
template <int N>
__global__ void permute_rows_kernel(const uint8_t* __restrict__ hidden, int32_t top_k,
                                    int64_t row_packs, const int32_t* __restrict__ row_of,
                                    uint8_t* __restrict__ permuted) {
  using P = Pack<uint8_t, N>;
  const int64_t t = blockIdx.x;
  const P* src = reinterpret_cast<const P*>(hidden) + t * row_packs;
  for (int64_t p = threadIdx.x; p < row_packs; p += blockDim.x) {
    const P value = src[p];
    for (int32_t j = 0; j < top_k; ++j) {
      const int32_t row = row_of[t * top_k + j];
      if (row >= 0) reinterpret_cast<P*>(permuted)[row * row_packs + p] = value;
    }
  }
}

template <typename T, int N>
__global__ void unpermute_kernel(const T* __restrict__ expert_out, int64_t width,
                                 const int32_t* __restrict__ row_of,
                                 const float* __restrict__ topk_weights, int32_t top_k,
                                 T* __restrict__ out) {
  using P = Pack<T, N>;
  const int64_t t = blockIdx.x;
  const int64_t packs = width / N;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.0f;
    for (int32_t j = 0; j < top_k; ++j) {
      const int32_t row = row_of[t * top_k + j];
      if (row < 0) continue;
      const float w = topk_weights[t * top_k + j];
      const P x = reinterpret_cast<const P*>(expert_out + row * width)[p];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] += w * to_float(x.v[i]);
    }
    P y;
#pragma unroll
    for (int i = 0; i < N; ++i) y.v[i] = from_float<T>(acc[i]);
    reinterpret_cast<P*>(out + t * width)[p] = y;
  }
}

}  // namespace

cudaError_t launch_permute_rows(const void* hidden, int64_t num_tokens, int32_t top_k,
                                int64_t row_bytes, const int32_t* row_of, void* permuted,
                                cudaStream_t stream) {
  if (num_tokens == 0 || row_bytes == 0) return cudaSuccess;
  const int n = pack_width<uint8_t>(row_bytes, hidden, permuted);
  return dispatch_pack(n, [&](auto pack) {
    constexpr int N = decltype(pack)::value;
    permute_rows_kernel<N><<<static_cast<unsigned>(num_tokens), kRowThreads, 0, stream>>>(
        static_cast<const uint8_t*>(hidden), top_k, row_bytes / N, row_of,
        static_cast<uint8_t*>(permuted));
    return cudaGetLastError();
  });
}

cudaError_t launch_unpermute(const void* expert_out, DType dtype, int64_t width,
                             const int32_t* row_of, const float* topk_weights, int64_t num_tokens,
                             int32_t top_k, void* out, cudaStream_t stream) {
  if (num_tokens == 0 || width == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const int n = pack_width<T>(width, expert_out, out);
    return dispatch_pack(n, [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      if constexpr (N * sizeof(T) > 16) {
        return cudaErrorInvalidValue;  // never chosen by pack_width
      } else {
        unpermute_kernel<T, N><<<static_cast<unsigned>(num_tokens), kRowThreads, 0, stream>>>(
            static_cast<const T*>(expert_out), width, row_of, topk_weights, top_k,
            static_cast<T*>(out));
        return cudaGetLastError();
      }
    });
  });
}

}  // namespace moe_ep::kernels
