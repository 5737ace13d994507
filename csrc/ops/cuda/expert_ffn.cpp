// expert_ffn on CUDA: one cuBLAS GEMM per non-empty expert for the gate/up projection, one
// fused activation kernel over all rows, then one cuBLAS GEMM per expert for the down
// projection. The per-expert row counts are read on the host first (one device-to-host copy
// of E+1 offsets), as cuBLAS takes its sizes from the host.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "ops/cuda/common.h"
#include "ops/expert_ffn.h"

namespace moe_ep::ops {
namespace {

void check_cublas(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "moe_ep: cuBLAS ", what, " failed with status ",
              static_cast<int>(status));
}

at::Tensor expert_ffn_cuda(const at::Tensor& x, const at::Tensor& expert_offsets,
                           const at::Tensor& w13, const at::Tensor& w2,
                           std::string_view activation) {
  const Activation act = check_expert_ffn_args(x, expert_offsets, w13, w2, activation);
  TORCH_CHECK(x.is_cuda(), "moe_ep: argument 'x' must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const std::vector<int64_t> offsets = checked_offsets(expert_offsets.cpu(), x.size(0));
  const at::Tensor input = x.contiguous(), gate_up_w = w13.contiguous(), down_w = w2.contiguous();
  const int64_t rows = input.size(0), hidden = input.size(1), ffn = down_w.size(2);
  at::Tensor out = at::empty({rows, hidden}, input.options());
  if (rows == 0) return out;
  at::Tensor gate_up = at::empty({rows, 2 * ffn}, input.options());
  at::Tensor activated = at::empty({rows, ffn}, input.options());
  const kernels::DType dtype = kernel_dtype(input.scalar_type());
  const int64_t element = input.element_size();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  auto at_row = [element](const at::Tensor& t, int64_t row, int64_t width) {
    return static_cast<char*>(t.data_ptr()) + row * width * element;
  };
  auto experts = [&](auto&& gemm) {
    for (size_t e = 0; e + 1 < offsets.size(); ++e) {
      if (offsets[e + 1] > offsets[e])
        gemm(static_cast<int64_t>(e), offsets[e], offsets[e + 1] - offsets[e]);
    }
  };
  experts([&](int64_t e, int64_t first, int64_t count) {
    check_cublas(
        kernels::gemm_nt(handle, dtype, count, 2 * ffn, hidden, at_row(input, first, hidden),
                         at_row(gate_up_w, e * 2 * ffn, hidden), at_row(gate_up, first, 2 * ffn)),
        "gate/up GEMM");
  });
  C10_CUDA_CHECK(kernels::launch_gated_activation(gate_up.data_ptr(), dtype, rows, ffn, act,
                                                  activated.data_ptr(), current_stream()));
  experts([&](int64_t e, int64_t first, int64_t count) {
    check_cublas(kernels::gemm_nt(handle, dtype, count, hidden, ffn, at_row(activated, first, ffn),
                                  at_row(down_w, e * hidden, ffn), at_row(out, first, hidden)),
                 "down GEMM");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { m.impl("expert_ffn", &expert_ffn_cuda); }

}  // namespace moe_ep::ops
