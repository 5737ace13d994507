// Host entry points of the CUDA kernels. Torch-free: the .cu files that implement them
// compile with nvcc alone (fast), and thin ATen adapters in csrc/ops/cuda/ call them.
// Each returns the launch status (cudaGetLastError) or the cuBLAS status.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/activation.h"
#include "core/dispatch_layout.h"
#include "core/routing.h"

namespace moe_ep::kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
using core::Activation;

// route: one thread per token running core::route_token.
cudaError_t launch_route(const void* logits, DType dtype, const float* bias,
                         const core::RouteConfig& config, int64_t num_tokens, int32_t* topk_ids,
                         float* topk_weights, cudaStream_t stream);

// Stable counting sort (core::stable_counting_sort's contract): rows x width keys at
// keys[r * row_stride + s]; keys outside [0, num_keys) get position -1 and, when `skipped` is
// not null, are added to *skipped (zeroed by the caller). offsets[num_keys + 1]; scratch needs
// counting_sort_scratch_ints(rows * width, num_keys) int32. num_keys <= kMaxSortKeys.
constexpr int32_t kMaxSortKeys = 4096;  // the kernels keep per-key state in shared memory
int64_t counting_sort_scratch_ints(int64_t num_items, int32_t num_keys);
cudaError_t launch_counting_sort(const int32_t* keys, int64_t rows, int32_t width,
                                 int64_t row_stride, int32_t num_keys, int32_t* scratch,
                                 int64_t* offsets, int32_t* position, int32_t* skipped,
                                 cudaStream_t stream);

// Row scatter (permute, and the dispatch receiver): permuted[row_of[t * top_k + j]] = hidden[t]
// for every j with row_of >= 0.
cudaError_t launch_permute_rows(const void* hidden, int64_t num_tokens, int32_t top_k,
                                int64_t row_bytes, const int32_t* row_of, void* permuted,
                                cudaStream_t stream);

// unpermute: out[t] = sum_j weights[t, j] * expert_out[row_of[t, j]] (fp32 accumulation;
// a row of -1 is skipped).
cudaError_t launch_unpermute(const void* expert_out, DType dtype, int64_t width,
                             const int32_t* row_of, const float* topk_weights, int64_t num_tokens,
                             int32_t top_k, void* out, cudaStream_t stream);

// Dispatch layout (core/dispatch_layout.h): zeroed device counters that route_choices
// accumulates into, read by write_header / write_status.
struct DispatchWorkspace {
  unsigned long long* errors;    // DispatchError bits
  unsigned long long* checksum;  // map checksum terms, summed
  unsigned long long* entries;   // [world]: (token, choice) pairs per rank
};

template <typename Id>
cudaError_t launch_route_choices(const Id* ids, int64_t num_tokens, int32_t top_k,
                                 const core::ExpertMap& map, const core::TokenChoices& out,
                                 const DispatchWorkspace& ws, bool with_checksum,
                                 cudaStream_t stream);

// header[world][kHeaderSize] from every chunk's rank offsets [chunks][world + 1] and entries
// [chunks][world].
cudaError_t launch_write_header(int64_t* header, int32_t world, int32_t chunks,
                                const int64_t* rank_offsets, const unsigned long long* entries,
                                const unsigned long long* errors,
                                const unsigned long long* checksum, int64_t config,
                                cudaStream_t stream);

// The status columns (status_column .. +kStatusSize) of the first metadata row of each
// rank's block of `capacity` rows.
cudaError_t launch_write_status(int32_t* meta, int32_t meta_stride, int32_t status_column,
                                int32_t world, int64_t capacity, const int64_t* rank_offsets,
                                const unsigned long long* errors,
                                const unsigned long long* checksum, int32_t config,
                                cudaStream_t stream);

cudaError_t launch_pack(const core::PackArgs& args, cudaStream_t stream);

// launch_pack for the FP8 dispatch (args.scale_column >= 0), x of `dtype`: one pass over x's
// rows, each quantized once (core/fp8.h) and written with its scales to every row it owns.
cudaError_t launch_pack_fp8(const core::PackArgs& args, DType dtype, cudaStream_t stream);

// The receiver's row scatter of FP8 rows (e4m3fn codes [num_rows, hidden]), dequantized to
// `dtype`: out[position[r * width + s]] = rows[r] x its block scales (float32 bits at
// scales[r * scale_stride + block]) for every position >= 0; each row is decoded once.
cudaError_t launch_scatter_dequantized(const uint8_t* rows, int64_t num_rows, int64_t hidden,
                                       const int32_t* scales, int64_t scale_stride, int32_t width,
                                       const int32_t* position, DType dtype, void* out,
                                       cudaStream_t stream);

// expert_ffn: out[r, :ffn] = act(gate_up[r, :ffn]) * gate_up[r, ffn:] in fp32, rounded, for
// r < min(rows, *row_bound). row_bound is a DEVICE int64 (expert_offsets[E]: the rows that
// arrived in a fixed-size buffer), read by the kernel; nullptr: all rows.
cudaError_t launch_gated_activation(const void* gate_up, DType dtype, int64_t rows, int64_t ffn,
                                    Activation activation, const int64_t* row_bound, void* out,
                                    cudaStream_t stream);

// Row-major C[m, n] = A[m, k] @ B[n, k]^T with fp32 accumulation (cuBLAS, the handle's stream).
cublasStatus_t gemm_nt(cublasHandle_t handle, DType dtype, int64_t m, int64_t n, int64_t k,
                       const void* a, const void* b, void* c);

// gemm_nt for `groups` problems in one cublasGemmGroupedBatchedEx call: row-major
// C_g[m[g], n] = A_g[m[g], k] @ B_g[n, k]^T for g < groups, fp32 accumulation. m is a HOST
// array of `groups` row counts (each > 0); a, b and c are DEVICE arrays of `groups` device
// pointers each (contiguous rows: lda = ldb = k, ldc = n). For fp16/bf16, cuBLAS documents
// alignment rules for the matrix pointers; 16-byte alignment of every one satisfies them.
cublasStatus_t gemm_nt_grouped(cublasHandle_t handle, DType dtype, int64_t groups, const int64_t* m,
                               int64_t n, int64_t k, const void* const* a, const void* const* b,
                               void* const* c);

}  // namespace moe_ep::kernels
