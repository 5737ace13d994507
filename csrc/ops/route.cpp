#include "ops/route.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/checks.h"

namespace moe_ep::ops {

core::RouteConfig route_config(const at::Tensor& logits, int64_t top_k, std::string_view score_func,
                               const std::optional<at::Tensor>& bias, int64_t n_group,
                               int64_t topk_group, bool renormalize, double scaling,
                               std::string_view group_score) {
  check_dim(logits, 2, "logits");
  check_float_dtype(logits, "logits");
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1, "moe_ep: argument 'logits' must have at least one expert column");
  TORCH_CHECK(top_k >= 1 && top_k <= core::kMaxTopK, "moe_ep: argument 'top_k' must be in [1, ",
              core::kMaxTopK, "], got ", top_k);
  TORCH_CHECK(top_k <= num_experts, "moe_ep: argument 'top_k' (", top_k,
              ") exceeds the number of experts (", num_experts, ")");
  TORCH_CHECK(score_func == "softmax" || score_func == "sigmoid",
              "moe_ep: argument 'score_func' must be \"softmax\" or \"sigmoid\", got \"",
              score_func, "\"");
  if (bias.has_value()) {
    check_dim(*bias, 1, "bias");
    check_dtype(*bias, at::kFloat, "bias");
    check_size(*bias, 0, num_experts, "bias");
    check_same_device(*bias, logits, "bias", "logits");
  }
  TORCH_CHECK(group_score == "max" || group_score == "top2_sum",
              "moe_ep: argument 'group_score' must be \"max\" or \"top2_sum\", got \"",
              group_score, "\"");
  TORCH_CHECK(n_group >= 1 && n_group <= core::kMaxGroups,
              "moe_ep: argument 'n_group' must be in [1, ", core::kMaxGroups, "], got ", n_group);
  if (n_group > 1) {
    TORCH_CHECK(num_experts % n_group == 0, "moe_ep: argument 'n_group' (", n_group,
                ") must divide the number of experts (", num_experts, ")");
    TORCH_CHECK(topk_group >= 1 && topk_group <= n_group,
                "moe_ep: argument 'topk_group' must be in [1, n_group=", n_group, "], got ",
                topk_group);
    TORCH_CHECK(top_k <= topk_group * (num_experts / n_group), "moe_ep: argument 'top_k' (", top_k,
                ") exceeds the experts of the topk_group=", topk_group, " chosen groups (",
                topk_group * (num_experts / n_group), ")");
  }
  core::RouteConfig config;
  config.num_experts = static_cast<int>(num_experts);
  config.top_k = static_cast<int>(top_k);
  config.score =
      score_func == "softmax" ? core::ScoreFunction::kSoftmax : core::ScoreFunction::kSigmoid;
  config.n_group = static_cast<int>(n_group);
  config.topk_group = n_group > 1 ? static_cast<int>(topk_group) : 1;
  config.group_score =
      group_score == "max" ? core::GroupScore::kMax : core::GroupScore::kTopTwoSum;
  config.renormalize = renormalize;
  config.scaling = static_cast<float>(scaling);
  return config;
}

namespace {

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t top_k,
                                             std::string_view score_func,
                                             const std::optional<at::Tensor>& bias, int64_t n_group,
                                             int64_t topk_group, bool renormalize, double scaling,
                                             std::string_view group_score) {
  const core::RouteConfig config = route_config(logits, top_k, score_func, bias, n_group,
                                                topk_group, renormalize, scaling, group_score);
  const at::Tensor input = logits.contiguous();
  const at::Tensor bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t num_tokens = input.size(0);
  at::Tensor ids = at::empty({num_tokens, top_k}, input.options().dtype(at::kInt));
  at::Tensor weights = at::empty({num_tokens, top_k}, input.options().dtype(at::kFloat));
  const float* bias_ptr = bias_values.defined() ? bias_values.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "route_cpu", [&] {
    const scalar_t* logits_ptr = input.data_ptr<scalar_t>();
    int32_t* ids_ptr = ids.data_ptr<int32_t>();
    float* weights_ptr = weights.data_ptr<float>();
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = logits_ptr + t * config.num_experts;
        core::route_token([row](int e) { return static_cast<float>(row[e]); }, bias_ptr, config,
                          ids_ptr + t * top_k, weights_ptr + t * top_k);
      }
    });
  });
  return {ids, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) { m.impl("route", &route_cpu); }

}  // namespace moe_ep::ops
