// Argument checks shared by the CPU and CUDA implementations. Every failure is a
// RuntimeError (c10::Error) whose message names the offending argument.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <utility>
#include <vector>

#include "ops/host_reads.h"

namespace moe_ep::ops {

inline void check_dim(const at::Tensor& t, int64_t dim, std::string_view name) {
  TORCH_CHECK(t.dim() == dim, "moe_ep: argument '", name, "' must be ", dim, "-D, got shape ",
              t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, std::string_view name) {
  TORCH_CHECK(t.scalar_type() == dtype, "moe_ep: argument '", name, "' must be ", dtype, ", got ",
              t.scalar_type());
}

// x [T, H] against expert weights w13 [E, 2F, H] (3-D): the same dtype and hidden size. A
// mismatch is the input's fault far more often than the weights', so the message names x.
inline void check_fits_weights(const at::Tensor& x, const at::Tensor& w13) {
  TORCH_CHECK(x.scalar_type() == w13.scalar_type(), "moe_ep: argument 'x' has dtype ",
              x.scalar_type(), " but the expert weights ('w13') are ", w13.scalar_type(),
              ": cast the input to the weights' dtype");
  TORCH_CHECK(x.dim() >= 1 && w13.dim() == 3 && x.size(-1) == w13.size(2),
              "moe_ep: argument 'x' has hidden size ", x.dim() >= 1 ? x.size(-1) : 0,
              " but the expert weights ('w13', [E, 2F, H]) take ", w13.dim() == 3 ? w13.size(2) : 0);
}

inline void check_float_dtype(const at::Tensor& t, std::string_view name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "moe_ep: argument '", name, "' must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_index_dtype(const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "moe_ep: argument '",
              name, "' must be int32 or int64, got ", t.scalar_type());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, std::string_view name) {
  TORCH_CHECK(t.size(dim) == expected, "moe_ep: argument '", name, "' must have size ", expected,
              " in dimension ", dim, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, std::string_view name,
                              std::string_view ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "moe_ep: argument '", name, "' is on ", t.device(),
              " but '", ref_name, "' is on ", ref.device());
}

// (min, max) of a non-empty integer tensor, read on the host (one counted host read).
inline std::pair<int64_t, int64_t> value_range(const at::Tensor& t) {
  const auto [low, high] = at::aminmax(t);
  const std::vector<int64_t> bounds = read_to_host(at::stack({low, high}));
  return {bounds[0], bounds[1]};
}

}  // namespace moe_ep::ops
