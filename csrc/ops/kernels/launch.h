// Host entry points of the CUDA kernels. Torch-free: the .cu files that implement them
// compile with nvcc alone (fast), and thin ATen adapters in csrc/ops/cuda/ call them.
// Each returns the launch status (cudaGetLastError) or the cuBLAS status.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/activation.h"
#include "core/routing.h"

namespace moe_ep::kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
using core::Activation;

// route: one thread per token running core::route_token.
cudaError_t launch_route(const void* logits, DType dtype, const float* bias,
                         const core::RouteConfig& config, int64_t num_tokens, int32_t* topk_ids,
                         float* topk_weights, cudaStream_t stream);

// permute, step 1: stable counting sort of num_items expert ids. chunk_counts needs
// permute_scratch_ints(num_items, num_experts) int32 of scratch; invalid_ids receives the
// number of ids outside [0, num_experts) (their row_of entry is -1).
int64_t permute_scratch_ints(int64_t num_items, int32_t num_experts);
cudaError_t launch_permute_layout(const int32_t* topk_ids, int64_t num_items, int32_t num_experts,
                                  int32_t* scratch, int64_t* expert_offsets, int32_t* row_of,
                                  int32_t* invalid_ids, cudaStream_t stream);

// permute, step 2: permuted[row_of[t * top_k + j]] = hidden[t] for every choice j.
cudaError_t launch_permute_rows(const void* hidden, int64_t num_tokens, int32_t top_k,
                                int64_t row_bytes, const int32_t* row_of, void* permuted,
                                cudaStream_t stream);

// unpermute: out[t] = sum_j weights[t, j] * expert_out[row_of[t, j]] (fp32 accumulation;
// a row of -1 is skipped).
cudaError_t launch_unpermute(const void* expert_out, DType dtype, int64_t width,
                             const int32_t* row_of, const float* topk_weights, int64_t num_tokens,
                             int32_t top_k, void* out, cudaStream_t stream);

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
