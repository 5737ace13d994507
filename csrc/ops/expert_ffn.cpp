#include "ops/expert_ffn.h"

#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/host_reads.h"

namespace moe_ep::ops {

Activation check_expert_ffn_args(const at::Tensor& x, const at::Tensor& expert_offsets,
                                 const at::Tensor& w13, const at::Tensor& w2,
                                 std::string_view activation) {
  check_dim(x, 2, "x");
  check_float_dtype(x, "x");
  check_dim(w13, 3, "w13");
  check_dim(w2, 3, "w2");
  check_fits_weights(x, w13);
  check_dtype(w2, x.scalar_type(), "w2");
  check_same_device(w13, x, "w13", "x");
  check_same_device(w2, x, "w2", "x");
  const int64_t num_experts = w13.size(0), hidden = x.size(1);
  TORCH_CHECK(w13.size(1) % 2 == 0, "moe_ep: argument 'w13' must stack gate and up projections ",
              "([E, 2F, H]), got an odd dimension 1 in ", w13.sizes());
  const int64_t ffn = w13.size(1) / 2;
  check_size(w2, 0, num_experts, "w2");
  check_size(w2, 1, hidden, "w2");
  check_size(w2, 2, ffn, "w2");
  check_dim(expert_offsets, 1, "expert_offsets");
  check_dtype(expert_offsets, at::kLong, "expert_offsets");
  check_size(expert_offsets, 0, num_experts + 1, "expert_offsets");
  TORCH_CHECK(expert_offsets.is_cpu() || expert_offsets.device() == x.device(),
              "moe_ep: argument 'expert_offsets' must be on the CPU or on x's device (", x.device(),
              "), got ", expert_offsets.device());
  TORCH_CHECK(activation == "silu" || activation == "gelu",
              "moe_ep: argument 'activation' must be \"silu\" or \"gelu\", got \"", activation,
              "\"");
  return activation == "silu" ? Activation::kSiluAndMul : Activation::kGeluAndMul;
}

std::vector<int64_t> checked_host_offsets(const at::Tensor& expert_offsets, int64_t num_rows) {
  std::vector<int64_t> values;
  if (expert_offsets.is_cpu()) {
    const at::Tensor offsets = expert_offsets.contiguous();
    values.assign(offsets.const_data_ptr<int64_t>(),
                  offsets.const_data_ptr<int64_t>() + offsets.numel());
  } else {
    values = read_to_host(expert_offsets);
  }
  TORCH_CHECK(values.front() == 0, "moe_ep: argument 'expert_offsets' must start at 0, got ",
              values.front());
  TORCH_CHECK(values.back() <= num_rows, "moe_ep: argument 'expert_offsets' must end at most at ",
              "the number of rows of 'x' (", num_rows, "), got ", values.back());
  for (size_t e = 0; e + 1 < values.size(); ++e) {
    TORCH_CHECK(values[e] <= values[e + 1], "moe_ep: argument 'expert_offsets' must be ",
                "non-decreasing, got ", values[e], " then ", values[e + 1], " at expert ", e);
  }
  return values;
}

namespace {

// The gated activation in fp32, rounded to the input dtype like the CUDA kernel does.
at::Tensor gated_activation(const at::Tensor& gate_up, Activation activation) {
  const int64_t ffn = gate_up.size(1) / 2;
  const at::Tensor gate = gate_up.narrow(1, 0, ffn).to(at::kFloat);
  const at::Tensor up = gate_up.narrow(1, ffn, ffn).to(at::kFloat);
  const at::Tensor activated =
      activation == Activation::kSiluAndMul ? at::silu(gate) : at::gelu(gate);
  return (activated * up).to(gate_up.scalar_type());
}

// The offsets of a CPU x are CPU tensors, read here for free: always validated, whatever
// check_offsets says. Rows from offsets[E] on are left as allocated.
at::Tensor expert_ffn_cpu(const at::Tensor& x, const at::Tensor& expert_offsets,
                          const at::Tensor& w13, const at::Tensor& w2, std::string_view activation,
                          bool /*check_offsets*/) {
  const Activation act = check_expert_ffn_args(x, expert_offsets, w13, w2, activation);
  const std::vector<int64_t> offsets = checked_host_offsets(expert_offsets, x.size(0));
  at::NoGradGuard no_grad;  // forward-only op: mm_out refuses inputs that require grad
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(offsets.size()); ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    const at::Tensor gate_up = at::mm(x.narrow(0, offsets[e], rows), w13[e].t());
    at::Tensor dst = out.narrow(0, offsets[e], rows);
    at::mm_out(dst, gated_activation(gate_up, act), w2[e].t());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CPU, m) { m.impl("expert_ffn", &expert_ffn_cpu); }

}  // namespace moe_ep::ops
