// The FP8 dispatch on the GPU (core/fp8.h has the format and the CPU loops; docs/dispatch.md):
//   pack_fp8:            one block per token: its metadata, then each 128-channel block of its
//                        row reduced to a scale by one warp, quantized once and written with
//                        the scale to every rank the token goes to (the pack's one pass over x);
//   scatter_dequantized: one block per received row: decoded once, written in the layer dtype
//                        to the place of each of its entries (the receiver's row scatter).
// Both give the CPU path's bits: the same scale and inverse (IEEE division), the same
// rounding to e4m3fn (the hardware's where sm_89+ has it) and to the layer dtype.
#include <cuda_fp8.h>

#include "core/fp8.h"
#include "ops/kernels/dtype.cuh"

namespace moe_ep::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarp = 32;
constexpr int kLaneChannels = core::kFp8BlockSize / kWarp;  // a warp covers one scale block
static_assert(kLaneChannels == 4, "to_e4m3fn converts four channels");

__device__ __forceinline__ Pack<uint8_t, 4> to_e4m3fn(const float (&v)[4]) {
  Pack<uint8_t, 4> codes;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const __nv_fp8x2_storage_t low =
      __nv_cvt_float2_to_fp8x2(make_float2(v[0], v[1]), __NV_SATFINITE, __NV_E4M3);
  const __nv_fp8x2_storage_t high =
      __nv_cvt_float2_to_fp8x2(make_float2(v[2], v[3]), __NV_SATFINITE, __NV_E4M3);
  codes.v[0] = static_cast<uint8_t>(low & 0xffu);
  codes.v[1] = static_cast<uint8_t>(low >> 8);
  codes.v[2] = static_cast<uint8_t>(high & 0xffu);
  codes.v[3] = static_cast<uint8_t>(high >> 8);
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) codes.v[i] = core::e4m3fn_from_float(v[i]);
#endif
  return codes;
}

// kVector: hidden % 4 == 0 and aligned rows, so a lane's four channels are one vector access
// (all in the row or all past its end).
template <typename T, bool kVector>
__global__ void pack_fp8_kernel(core::PackArgs a) {
  __shared__ int32_t send_rows[core::kMaxTopK];
  __shared__ int32_t num_send_rows;
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    core::pack_token_metadata(a, t);
    int32_t n = 0;
    for (int32_t j = 0; j < a.top_k; ++j) {
      const int64_t pair = t * a.top_k + j;
      if (a.dest_key[pair] >= 0 && a.token_slot[pair] >= 0) send_rows[n++] = a.token_slot[pair];
    }
    num_send_rows = n;
  }
  __syncthreads();
  if (num_send_rows == 0) return;
  const int64_t hidden = a.row_bytes / static_cast<int64_t>(sizeof(T));
  const T* x = reinterpret_cast<const T*>(a.x) + t * hidden;
  const int lane = threadIdx.x % kWarp;
  const int64_t blocks = core::fp8_scale_blocks(hidden);
  for (int64_t block = threadIdx.x / kWarp; block < blocks; block += blockDim.x / kWarp) {
    const int64_t first = block * core::kFp8BlockSize + lane * kLaneChannels;
    float v[kLaneChannels] = {};
    if constexpr (kVector) {
      if (first < hidden) {
        const auto in = *reinterpret_cast<const Pack<T, kLaneChannels>*>(x + first);
#pragma unroll
        for (int i = 0; i < kLaneChannels; ++i) v[i] = to_float(in.v[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kLaneChannels; ++i) {
        v[i] = first + i < hidden ? to_float(x[first + i]) : 0.0f;
      }
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kLaneChannels; ++i) amax = fmaxf(amax, fabsf(v[i]));
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    const float scale = core::fp8_block_scale(amax), inverse = 1.0f / scale;
#pragma unroll
    for (int i = 0; i < kLaneChannels; ++i) v[i] *= inverse;
    const Pack<uint8_t, kLaneChannels> codes = to_e4m3fn(v);
    for (int32_t r = 0; r < num_send_rows; ++r) {
      uint8_t* out = a.x_send + static_cast<int64_t>(send_rows[r]) * hidden;
      if constexpr (kVector) {
        if (first < hidden) *reinterpret_cast<Pack<uint8_t, kLaneChannels>*>(out + first) = codes;
      } else {
#pragma unroll
        for (int i = 0; i < kLaneChannels; ++i) {
          if (first + i < hidden) out[first + i] = codes.v[i];
        }
      }
      if (lane == 0) {
        int32_t* meta = a.meta_send + static_cast<int64_t>(send_rows[r]) * a.meta_stride;
        reinterpret_cast<float*>(meta + a.scale_column)[block] = scale;
      }
    }
  }
}

template <typename T, int N>
__global__ void scatter_dequantized_kernel(const uint8_t* __restrict__ rows, int64_t hidden,
                                           const int32_t* __restrict__ scales, int64_t scale_stride,
                                           int32_t width, const int32_t* __restrict__ position,
                                           T* __restrict__ out) {
  using Codes = Pack<uint8_t, N>;
  using Values = Pack<T, N>;
  const int64_t r = blockIdx.x;
  const int32_t* places = position + r * width;
  const auto* row_scales = reinterpret_cast<const float*>(scales + r * scale_stride);
  const auto* src = reinterpret_cast<const Codes*>(rows + r * hidden);
  const int64_t packs = hidden / N;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Codes codes = src[p];
    const float scale = row_scales[p * N / core::kFp8BlockSize];  // N divides 128
    Values values;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      values.v[i] = from_float<T>(core::e4m3fn_to_float(codes.v[i]) * scale);
    }
    for (int32_t s = 0; s < width; ++s) {
      const int32_t place = places[s];
      if (place >= 0) reinterpret_cast<Values*>(out + place * hidden)[p] = values;
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

cudaError_t launch_pack_fp8(const core::PackArgs& args, DType dtype, cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const int64_t hidden = args.row_bytes / static_cast<int64_t>(sizeof(T));
    const bool vector = hidden % kLaneChannels == 0 && aligned(args.x, kLaneChannels * sizeof(T)) &&
                        aligned(args.x_send, kLaneChannels);
    const auto blocks = static_cast<unsigned>(args.num_tokens);
    if (vector) {
      pack_fp8_kernel<T, true><<<blocks, kThreads, 0, stream>>>(args);
    } else {
      pack_fp8_kernel<T, false><<<blocks, kThreads, 0, stream>>>(args);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_scatter_dequantized(const uint8_t* rows, int64_t num_rows, int64_t hidden,
                                       const int32_t* scales, int64_t scale_stride, int32_t width,
                                       const int32_t* position, DType dtype, void* out,
                                       cudaStream_t stream) {
  if (num_rows == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const int widest = pack_width<uint8_t>(hidden, rows, out);
    const int n = widest * sizeof(T) > 16 ? 16 / static_cast<int>(sizeof(T)) : widest;
    return dispatch_pack(n, [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      if constexpr (N * sizeof(T) > 16) {
        return cudaErrorInvalidValue;  // never chosen: n is capped above
      } else {
        scatter_dequantized_kernel<T, N><<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(
            rows, hidden, scales, scale_stride, width, position, static_cast<T*>(out));
        return cudaGetLastError();
      }
    });
  });
}

}  // namespace moe_ep::kernels
