// Device-side helpers shared by the kernels: element types, packed vector access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops/kernels/launch.h"

namespace moe_ep::kernels {

// Calls fn(T{}) with T the CUDA element type of dtype.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat16:
      return fn(__half{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements loaded or stored as one aligned vector access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The widest pack (up to 16 bytes) whose accesses stay aligned for rows of `width` elements
// starting at the given addresses.
template <typename T>
inline int pack_width(int64_t width, const void* a, const void* b) {
  for (int n = 16 / static_cast<int>(sizeof(T)); n > 1; n /= 2) {
    const auto bytes = static_cast<uintptr_t>(n * sizeof(T));
    if (width % n == 0 && reinterpret_cast<uintptr_t>(a) % bytes == 0 &&
        reinterpret_cast<uintptr_t>(b) % bytes == 0) {
      return n;
    }
  }
  return 1;
}

// Calls fn(std::integral_constant<int, N>{}) for the pack width n (1, 2, 4, 8 or 16).
template <typename Fn>
cudaError_t dispatch_pack(int n, Fn&& fn) {
  switch (n) {
    case 16:
      return fn(std::integral_constant<int, 16>{});
    case 8:
      return fn(std::integral_constant<int, 8>{});
    case 4:
      return fn(std::integral_constant<int, 4>{});
    case 2:
      return fn(std::integral_constant<int, 2>{});
    default:
      return fn(std::integral_constant<int, 1>{});
  }
}

}  // namespace moe_ep::kernels
