// unpermute on CUDA: the ATen adapter of kernels/permute.cu's weighted combine. With
// check_rows it validates the rows with one counted device-to-host read (a bad row would
// read out of bounds); moe_ep's own callers pass rows it produced and skip the check.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/cuda/common.h"
#include "ops/permute.h"

namespace moe_ep::ops {
namespace {

at::Tensor unpermute_cuda(const at::Tensor& expert_out, const at::Tensor& row_of,
                          const at::Tensor& topk_weights, bool check_rows) {
  check_unpermute_args(expert_out, row_of, topk_weights, check_rows);
  const c10::cuda::CUDAGuard device_guard(expert_out.device());
  const at::Tensor rows = row_of.contiguous();
  const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor input = expert_out.contiguous();
  at::Tensor out = at::empty({rows.size(0), input.size(1)}, input.options());
  C10_CUDA_CHECK(kernels::launch_unpermute(
      input.data_ptr(), kernel_dtype(input.scalar_type()), input.size(1), rows.data_ptr<int32_t>(),
      weights.data_ptr<float>(), rows.size(0), static_cast<int32_t>(rows.size(1)), out.data_ptr(),
      current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { m.impl("unpermute", &unpermute_cuda); }

}  // namespace moe_ep::ops
