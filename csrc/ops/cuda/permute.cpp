// permute / unpermute on CUDA: ATen adapters over the kernels of kernels/permute.cu.
// Each validates its index inputs with one device-to-host read (the ids or rows are data,
// and a bad one would otherwise read or write out of bounds).
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/cuda/common.h"
#include "ops/permute.h"

namespace moe_ep::ops {
namespace {

constexpr int64_t kMaxCudaExperts =
    4096;  // the layout kernels keep per-expert state in shared memory

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& hidden,
                                                            const at::Tensor& topk_ids,
                                                            int64_t num_experts) {
  const at::Tensor ids = checked_permute_ids(hidden, topk_ids, num_experts);
  TORCH_CHECK(num_experts <= kMaxCudaExperts,
              "moe_ep: argument 'num_experts' must be <= ", kMaxCudaExperts, " on CUDA, got ",
              num_experts);
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const at::Tensor input = hidden.contiguous();
  const int64_t num_tokens = input.size(0), top_k = ids.size(1);
  const auto experts = static_cast<int32_t>(num_experts);
  const auto int_options = ids.options();
  at::Tensor scratch =
      at::empty({kernels::permute_scratch_ints(ids.numel(), experts) + 1}, int_options);
  at::Tensor offsets = at::empty({num_experts + 1}, int_options.dtype(at::kLong));
  at::Tensor row_of = at::empty({num_tokens, top_k}, int_options);
  int32_t* invalid_ids = scratch.data_ptr<int32_t>();
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(kernels::launch_permute_layout(ids.data_ptr<int32_t>(), ids.numel(), experts,
                                                invalid_ids + 1, offsets.data_ptr<int64_t>(),
                                                row_of.data_ptr<int32_t>(), invalid_ids, stream));
  const int32_t invalid = scratch.narrow(0, 0, 1).item<int32_t>();
  TORCH_CHECK(invalid == 0, "moe_ep: argument 'topk_ids' holds ", invalid,
              " expert id(s) outside [0, num_experts=", num_experts, ")");
  at::Tensor permuted = at::empty({ids.numel(), input.size(1)}, input.options());
  C10_CUDA_CHECK(
      kernels::launch_permute_rows(input.data_ptr(), num_tokens, static_cast<int32_t>(top_k),
                                   input.size(1) * input.element_size(), row_of.data_ptr<int32_t>(),
                                   permuted.data_ptr(), stream));
  return {permuted, offsets, row_of};
}

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

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
}

}  // namespace moe_ep::ops
