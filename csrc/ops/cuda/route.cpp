// route on CUDA: ATen adapter over kernels::launch_route.
#include <torch/library.h>

#include "ops/cuda/common.h"
#include "ops/route.h"

namespace moe_ep::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t top_k,
                                              std::string_view score_func,
                                              const std::optional<at::Tensor>& bias,
                                              int64_t n_group, int64_t topk_group, bool renormalize,
                                              double scaling, std::string_view group_score) {
  const core::RouteConfig config = route_config(logits, top_k, score_func, bias, n_group,
                                                topk_group, renormalize, scaling, group_score);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor input = logits.contiguous();
  const at::Tensor bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor ids = at::empty({input.size(0), top_k}, input.options().dtype(at::kInt));
  at::Tensor weights = at::empty({input.size(0), top_k}, input.options().dtype(at::kFloat));
  C10_CUDA_CHECK(kernels::launch_route(
      input.data_ptr(), kernel_dtype(input.scalar_type()),
      bias_values.defined() ? bias_values.data_ptr<float>() : nullptr, config, input.size(0),
      ids.data_ptr<int32_t>(), weights.data_ptr<float>(), current_stream()));
  return {ids, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { m.impl("route", &route_cuda); }

}  // namespace moe_ep::ops
