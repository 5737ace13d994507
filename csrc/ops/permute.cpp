#include "ops/permute.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"
#include "ops/host_reads.h"
#include "ops/layout_kernels.h"

namespace moe_ep::ops {

at::Tensor checked_permute_ids(const at::Tensor& hidden, const at::Tensor& topk_ids,
                               int64_t num_experts) {
  check_dim(hidden, 2, "hidden");
  check_float_dtype(hidden, "hidden");
  check_dim(topk_ids, 2, "topk_ids");
  check_index_dtype(topk_ids, "topk_ids");
  check_size(topk_ids, 0, hidden.size(0), "topk_ids");
  check_same_device(topk_ids, hidden, "topk_ids", "hidden");
  TORCH_CHECK(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(),
              "moe_ep: argument 'num_experts' must be >= 1, got ", num_experts);
  TORCH_CHECK(topk_ids.numel() <= std::numeric_limits<int32_t>::max(),
              "moe_ep: argument 'topk_ids' has more than 2^31-1 entries");
  TORCH_CHECK(!topk_ids.is_cuda() || num_experts <= kMaxCudaSortKeys, "moe_ep: argument ",
              "'num_experts' must be <= ", kMaxCudaSortKeys, " on CUDA, got ", num_experts);
  // Ids past int32 are clamped to an invalid id first, so that none wraps into a valid one.
  const at::Tensor ids =
      topk_ids.scalar_type() == at::kLong ? topk_ids.clamp(-1, num_experts) : topk_ids;
  return ids.to(at::kInt).contiguous();
}

void check_unpermute_args(const at::Tensor& expert_out, const at::Tensor& row_of,
                          const at::Tensor& topk_weights, bool check_rows) {
  check_dim(expert_out, 2, "expert_out");
  check_float_dtype(expert_out, "expert_out");
  check_dim(row_of, 2, "row_of");
  check_dtype(row_of, at::kInt, "row_of");
  check_dim(topk_weights, 2, "topk_weights");
  check_float_dtype(topk_weights, "topk_weights");
  TORCH_CHECK(topk_weights.sizes() == row_of.sizes(), "moe_ep: argument 'topk_weights' must have ",
              "the shape of 'row_of' ", row_of.sizes(), ", got ", topk_weights.sizes());
  check_same_device(row_of, expert_out, "row_of", "expert_out");
  check_same_device(topk_weights, expert_out, "topk_weights", "expert_out");
  if (check_rows && row_of.numel() > 0) {
    const auto [low, high] = value_range(row_of);
    TORCH_CHECK(low >= -1 && high < expert_out.size(0), "moe_ep: argument 'row_of' must hold ",
                "rows in [0, ", expert_out.size(0), ") or -1 (no contribution), got values in [",
                low, ", ", high, "]");
  }
}

namespace {

// One implementation for both devices: the layout kernels (csrc/ops/layout_kernels.h) run the
// stable counting sort and the row scatter on the ids' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_impl(const at::Tensor& hidden,
                                                            const at::Tensor& topk_ids,
                                                            int64_t num_experts, bool check_ids) {
  const at::Tensor ids = checked_permute_ids(hidden, topk_ids, num_experts);
  const c10::DeviceGuard device_guard(hidden.device());
  const Grouping grouping = group_by_key(ids, ids.size(1), num_experts, check_ids);
  if (check_ids) {
    const int64_t invalid = read_to_host(grouping.skipped).front();
    TORCH_CHECK(invalid == 0, "moe_ep: argument 'topk_ids' holds ", invalid,
                " expert id(s) outside [0, num_experts=", num_experts, ")");
  }
  return {scatter_rows(hidden, grouping.position, ids.numel()), grouping.offsets,
          grouping.position};
}

at::Tensor unpermute_cpu(const at::Tensor& expert_out, const at::Tensor& row_of,
                         const at::Tensor& topk_weights, bool check_rows) {
  check_unpermute_args(expert_out, row_of, topk_weights, check_rows);
  const at::Tensor rows = row_of.contiguous();
  const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor input = expert_out.contiguous();
  const int64_t num_tokens = rows.size(0), top_k = rows.size(1), width = input.size(1);
  at::Tensor out = at::empty({num_tokens, width}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "unpermute_cpu", [&] {
        const scalar_t* src = input.data_ptr<scalar_t>();
        scalar_t* dst = out.data_ptr<scalar_t>();
        const int32_t* row_ptr = rows.data_ptr<int32_t>();
        const float* weight_ptr = weights.data_ptr<float>();
        at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
          std::vector<float> acc(width);
          for (int64_t t = begin; t < end; ++t) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t j = 0; j < top_k; ++j) {
              const int32_t row = row_ptr[t * top_k + j];
              if (row < 0) continue;
              const float w = weight_ptr[t * top_k + j];
              const scalar_t* x = src + row * width;
              for (int64_t h = 0; h < width; ++h) acc[h] += w * static_cast<float>(x[h]);
            }
            for (int64_t h = 0; h < width; ++h) dst[t * width + h] = static_cast<scalar_t>(acc[h]);
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) {
  m.impl("permute", &permute_impl);
  m.impl("unpermute", &unpermute_cpu);
}

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { m.impl("permute", &permute_impl); }

}  // namespace moe_ep::ops
