// permute / unpermute kernels.
//
// The stable counting sort runs in three small kernels over chunks of kChunk ids:
//   1. count:  per-chunk histograms of expert ids (shared-memory atomics);
//   2. scan:   per expert, an exclusive scan over chunks plus the expert's global offset;
//   3. rank:   one warp per chunk walks its ids in order; __match_any_sync finds lanes with
//              the same expert, so each id's rank keeps the input order (stability) without
//              global atomics.
// The row copies and the weighted combine are bandwidth-bound and use 16-byte accesses
// where the row size and alignment allow.
#include "ops/kernels/dtype.cuh"

namespace moe_ep::kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kChunk = 256;  // ids per chunk: 8 warp-steps in the rank kernel
constexpr int kCountThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kRowThreads = 128;

int64_t num_chunks(int64_t num_items) { return (num_items + kChunk - 1) / kChunk; }

__global__ void count_kernel(const int32_t* __restrict__ ids, int64_t num_items,
                             int32_t num_experts, int32_t* __restrict__ chunk_counts,
                             int32_t* __restrict__ invalid_ids) {
  extern __shared__ int32_t histogram[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) histogram[e] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (i < num_items) {
    const int32_t e = ids[i];
    if (e >= 0 && e < num_experts) {
      atomicAdd(&histogram[e], 1);
    } else {
      atomicAdd(invalid_ids, 1);
    }
  }
  __syncthreads();
  int32_t* counts = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = histogram[e];
}

// One block. chunk_counts[c][e] becomes the first sorted position of chunk c's ids of e.
__global__ void scan_kernel(int32_t* __restrict__ chunk_counts, int64_t chunks, int32_t num_experts,
                            int64_t* __restrict__ expert_offsets) {
  extern __shared__ int64_t totals[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int64_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t& slot = chunk_counts[c * num_experts + e];
      const int32_t count = slot;
      slot = static_cast<int32_t>(running);
      running += count;
    }
    totals[e] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t offset = 0;
    for (int e = 0; e < num_experts; ++e) {
      const int64_t total = totals[e];
      totals[e] = offset;
      expert_offsets[e] = offset;
      offset += total;
    }
    expert_offsets[num_experts] = offset;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const auto base = static_cast<int32_t>(totals[e]);
    for (int64_t c = 0; c < chunks; ++c) chunk_counts[c * num_experts + e] += base;
  }
}

// One warp per chunk.
__global__ void rank_kernel(const int32_t* __restrict__ ids, int64_t num_items, int32_t num_experts,
                            const int32_t* __restrict__ chunk_counts,
                            int32_t* __restrict__ row_of) {
  extern __shared__ int32_t cursor[];
  const int lane = threadIdx.x;
  const int32_t* starts = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = lane; e < num_experts; e += kWarp) cursor[e] = starts[e];
  __syncwarp();
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int step = 0; step < kChunk / kWarp; ++step) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + step * kWarp + lane;
    int32_t e = i < num_items ? ids[i] : -1;
    if (e >= num_experts) e = -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    int32_t position = -1;
    if (e >= 0) position = cursor[e] + __popc(peers & lower_lanes);
    if (i < num_items) row_of[i] = position;
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) cursor[e] += __popc(peers);
    __syncwarp();
  }
}

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

int64_t permute_scratch_ints(int64_t num_items, int32_t num_experts) {
  return num_chunks(num_items) * num_experts;
}

cudaError_t launch_permute_layout(const int32_t* topk_ids, int64_t num_items, int32_t num_experts,
                                  int32_t* scratch, int64_t* expert_offsets, int32_t* row_of,
                                  int32_t* invalid_ids, cudaStream_t stream) {
  const int64_t chunks = num_chunks(num_items);
  cudaError_t status = cudaMemsetAsync(invalid_ids, 0, sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  const size_t counts_bytes = num_experts * sizeof(int32_t);
  if (chunks > 0) {
    count_kernel<<<static_cast<unsigned>(chunks), kCountThreads, counts_bytes, stream>>>(
        topk_ids, num_items, num_experts, scratch, invalid_ids);
  }
  scan_kernel<<<1, kScanThreads, num_experts * sizeof(int64_t), stream>>>(
      scratch, chunks, num_experts, expert_offsets);
  if (chunks > 0) {
    rank_kernel<<<static_cast<unsigned>(chunks), kWarp, counts_bytes, stream>>>(
        topk_ids, num_items, num_experts, scratch, row_of);
  }
  return cudaGetLastError();
}

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
