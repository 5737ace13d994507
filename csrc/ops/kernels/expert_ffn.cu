// expert_ffn building blocks: the fused gated activation and a row-major GEMM over cuBLAS,
// one problem per call or a group of problems in one grouped call.
#include <algorithm>
#include <vector>

#include "ops/kernels/dtype.cuh"

namespace moe_ep::kernels {
namespace {

constexpr int kActivationThreads = 256;
// Enough blocks to fill a Hopper GPU a few times over; more rows loop in each block.
constexpr int64_t kMaxActivationBlocks = 2048;

template <Activation kAct>
__device__ __forceinline__ float activate(float x) {
  if constexpr (kAct == Activation::kSiluAndMul) {
    return x / (1.0f + expf(-x));
  } else {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));  // exact (erf) GELU
  }
}

// Block-strided rows; N-element packs along the FFN dimension. Rows from the device bound on
// (the real row count of a fixed-size buffer) are skipped without being read.
template <typename T, int N, Activation kAct>
__global__ void gated_activation_kernel(const T* __restrict__ gate_up, int64_t rows, int64_t ffn,
                                        const int64_t* __restrict__ row_bound,
                                        T* __restrict__ out) {
  using P = Pack<T, N>;
  const int64_t bound = row_bound == nullptr ? rows : *row_bound;
  const int64_t end = bound < rows ? bound : rows;
  for (int64_t r = blockIdx.x; r < end; r += gridDim.x) {
    const P* gate = reinterpret_cast<const P*>(gate_up + r * 2 * ffn);
    const P* up = reinterpret_cast<const P*>(gate_up + r * 2 * ffn + ffn);
    P* dst = reinterpret_cast<P*>(out + r * ffn);
    for (int64_t p = threadIdx.x; p < ffn / N; p += blockDim.x) {
      const P g = gate[p], u = up[p];
      P y;
#pragma unroll
      for (int i = 0; i < N; ++i)
        y.v[i] = from_float<T>(activate<kAct>(to_float(g.v[i])) * to_float(u.v[i]));
      dst[p] = y;
    }
  }
}

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

}  // namespace

cudaError_t launch_gated_activation(const void* gate_up, DType dtype, int64_t rows, int64_t ffn,
                                    Activation activation, const int64_t* row_bound, void* out,
                                    cudaStream_t stream) {
  if (rows == 0 || ffn == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    // gate and up start ffn elements apart: the pack must divide ffn for both to align.
    const int n = pack_width<T>(ffn, gate_up, out);
    return dispatch_pack(n, [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      if constexpr (N * sizeof(T) > 16) {
        return cudaErrorInvalidValue;  // never chosen by pack_width
      } else {
        const auto blocks = static_cast<unsigned>(std::min(rows, kMaxActivationBlocks));
        const auto* src = static_cast<const T*>(gate_up);
        auto* dst = static_cast<T*>(out);
        if (activation == Activation::kSiluAndMul) {
          gated_activation_kernel<T, N, Activation::kSiluAndMul>
              <<<blocks, kActivationThreads, 0, stream>>>(src, rows, ffn, row_bound, dst);
        } else {
          gated_activation_kernel<T, N, Activation::kGeluAndMul>
              <<<blocks, kActivationThreads, 0, stream>>>(src, rows, ffn, row_bound, dst);
        }
        return cudaGetLastError();
      }
    });
  });
}

cublasStatus_t gemm_nt(cublasHandle_t handle, DType dtype, int64_t m, int64_t n, int64_t k,
                       const void* a, const void* b, void* c) {
  // Row-major C[m, n] = A[m, k] B[n, k]^T is column-major C^T[n, m] = B A^T: cuBLAS sees B
  // (column-major [k, n], transposed) times A (column-major [k, m]).
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t type = cuda_type(dtype);
  return cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                      static_cast<int>(k), &alpha, b, type, static_cast<int>(k), a, type,
                      static_cast<int>(k), &beta, c, type, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t gemm_nt_grouped(cublasHandle_t handle, DType dtype, int64_t groups, const int64_t* m,
                               int64_t n, int64_t k, const void* const* a, const void* const* b,
                               void* const* c) {
  if (groups == 0) return CUBLAS_STATUS_SUCCESS;
  // The swap of gemm_nt for every group: cuBLAS computes the column-major C_g^T[n, m_g] =
  // B_g A_g^T, so its (m, n, k) is (n, m_g, k), its A is our B (transposed) and its B is our
  // A. Every array below but the pointer arrays is read on the host, one entry per group;
  // each group holds one problem (group_size 1), so the pointer arrays have `groups` entries.
  const auto count = static_cast<size_t>(groups);
  std::vector<int> rows(count);
  for (size_t g = 0; g < count; ++g) rows[g] = static_cast<int>(m[g]);
  const std::vector<int> cols(count, static_cast<int>(n)), depth(count, static_cast<int>(k));
  const std::vector<int> one_problem(count, 1);
  const std::vector<cublasOperation_t> op_b(count, CUBLAS_OP_T), op_a(count, CUBLAS_OP_N);
  const std::vector<float> alpha(count, 1.0f), beta(count, 0.0f);
  const cudaDataType_t type = cuda_type(dtype);
  // Argument order: transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
  // Ctype, ldc, group_count, group_size, computeType (lda = ldb = k, ldc = n, as in gemm_nt).
  return cublasGemmGroupedBatchedEx(
      handle, op_b.data(), op_a.data(), cols.data(), rows.data(), depth.data(), alpha.data(), b,
      type, depth.data(), a, type, depth.data(), beta.data(), c, type, cols.data(),
      static_cast<int>(groups), one_problem.data(), CUBLAS_COMPUTE_32F);
}

}  // namespace moe_ep::kernels
