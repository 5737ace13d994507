// expert_ffn on CUDA: the gate/up projection of every non-empty expert over cuBLAS, one fused
// activation kernel over all rows, then the down projection of every non-empty expert. The
// per-expert row counts are read on the host first (one device-to-host copy of E+1 offsets),
// as cuBLAS takes its sizes from the host.
//
// MOE_EP_EXPERT_GEMM, read on every call, picks how the projections reach cuBLAS:
//   per_expert (default, also when unset or empty): one cublasGemmEx per non-empty expert;
//   grouped: one cublasGemmGroupedBatchedEx per projection over the non-empty experts.
// The default stays per_expert until a GPU run measures which is faster.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "ops/cuda/common.h"
#include "ops/expert_ffn.h"

namespace moe_ep::ops {
namespace {

constexpr const char* kGemmVariable = "MOE_EP_EXPERT_GEMM";

enum class ExpertGemm { kPerExpert, kGrouped };

ExpertGemm expert_gemm_from_env() {
  const char* raw = std::getenv(kGemmVariable);
  const std::string_view value = raw == nullptr ? std::string_view() : std::string_view(raw);
  if (value.empty() || value == "per_expert") return ExpertGemm::kPerExpert;
  TORCH_CHECK(value == "grouped", "moe_ep: environment variable ", kGemmVariable,
              " must be \"per_expert\" (the default) or \"grouped\", got \"", value, "\"");
  return ExpertGemm::kGrouped;
}

void check_cublas(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "moe_ep: cuBLAS ", what, " failed with status ",
              static_cast<int>(status));
}

// One non-empty expert: its rows first..first+count of x.
struct ExpertRows {
  int64_t expert, first, count;
};

// The two projections as row-major GEMMs C[count, n] = A[count, k] @ B[n, k]^T per expert.
struct Projection {
  const at::Tensor &a, &b, &c;  // rows of a and c, expert blocks of b
  int64_t n, k;
  const char* what;
};

void* row_ptr(const at::Tensor& t, int64_t row, int64_t width) {
  return static_cast<char*>(t.data_ptr()) + row * width * t.element_size();
}

void per_expert_gemm(cublasHandle_t handle, kernels::DType dtype, const Projection& p,
                     const std::vector<ExpertRows>& experts) {
  for (const ExpertRows& e : experts) {
    check_cublas(kernels::gemm_nt(handle, dtype, e.count, p.n, p.k, row_ptr(p.a, e.first, p.k),
                                  row_ptr(p.b, e.expert * p.n, p.k), row_ptr(p.c, e.first, p.n)),
                 p.what);
  }
}

// The A, B and C pointers of every expert of a projection, in that order (3 * G entries).
void append_pointers(const Projection& p, const std::vector<ExpertRows>& experts,
                     std::vector<int64_t>& table) {
  for (const ExpertRows& e : experts)
    table.push_back(reinterpret_cast<intptr_t>(row_ptr(p.a, e.first, p.k)));
  for (const ExpertRows& e : experts)
    table.push_back(reinterpret_cast<intptr_t>(row_ptr(p.b, e.expert * p.n, p.k)));
  for (const ExpertRows& e : experts)
    table.push_back(reinterpret_cast<intptr_t>(row_ptr(p.c, e.first, p.n)));
}

at::Tensor expert_ffn_cuda(const at::Tensor& x, const at::Tensor& expert_offsets,
                           const at::Tensor& w13, const at::Tensor& w2,
                           std::string_view activation) {
  const Activation act = check_expert_ffn_args(x, expert_offsets, w13, w2, activation);
  TORCH_CHECK(x.is_cuda(), "moe_ep: argument 'x' must be a CUDA tensor");
  const ExpertGemm gemm = expert_gemm_from_env();
  const c10::cuda::CUDAGuard device_guard(x.device());
  const std::vector<int64_t> offsets = checked_offsets(expert_offsets.cpu(), x.size(0));
  const at::Tensor input = x.contiguous(), gate_up_w = w13.contiguous(), down_w = w2.contiguous();
  const int64_t rows = input.size(0), hidden = input.size(1), ffn = down_w.size(2);
  at::Tensor out = at::empty({rows, hidden}, input.options());
  if (rows == 0) return out;
  at::Tensor gate_up = at::empty({rows, 2 * ffn}, input.options());
  at::Tensor activated = at::empty({rows, ffn}, input.options());
  const kernels::DType dtype = kernel_dtype(input.scalar_type());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  std::vector<ExpertRows> experts;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] > offsets[e])
      experts.push_back({static_cast<int64_t>(e), offsets[e], offsets[e + 1] - offsets[e]});
  }
  const Projection gate_up_proj{input, gate_up_w, gate_up, 2 * ffn, hidden, "gate/up GEMM"};
  const Projection down_proj{activated, down_w, out, hidden, ffn, "down GEMM"};

  std::vector<int64_t> table;  // grouped: the pointer arrays of both projections
  if (gemm == ExpertGemm::kGrouped) {
    table.reserve(6 * experts.size());
    append_pointers(gate_up_proj, experts, table);
    append_pointers(down_proj, experts, table);
    // cuBLAS documents alignment rules for the matrix pointers of the fp16/bf16 grouped GEMM
    // (a misaligned one faults on the device); 16-byte alignment of every pointer satisfies
    // them all. A call that misses it, whatever its dtype (rows whose size in bytes is not a
    // multiple of 16, views at an odd offset), takes the per-expert path instead.
    for (const int64_t ptr : table) {
      if (ptr % 16 != 0) {
        table.clear();
        break;
      }
    }
  }
  const bool grouped = !table.empty();

  // The pointer arrays must be in device memory: written here into a pinned host tensor and
  // copied on the current stream without waiting. The host tensor is freed when this call
  // returns, but the caching host allocator records the copy's stream and reuses the pinned
  // block only once the copy has completed (and never, for a block used in a CUDA graph
  // capture).
  static_assert(sizeof(int64_t) == sizeof(void*), "pointers are stored as int64");
  const auto groups = static_cast<int64_t>(experts.size());
  std::vector<int64_t> counts;
  at::Tensor device_table;
  if (grouped) {
    at::Tensor host_table =
        at::empty({6 * groups}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(host_table.data_ptr<int64_t>(), table.data(), table.size() * sizeof(int64_t));
    device_table = host_table.to(at::TensorOptions().device(input.device()), /*non_blocking=*/true);
    for (const ExpertRows& e : experts) counts.push_back(e.count);
  }
  // One projection; its pointer arrays (grouped) start at entry first_array * groups.
  auto project = [&](const Projection& p, int64_t first_array) {
    if (!grouped) return per_expert_gemm(handle, dtype, p, experts);
    const int64_t* arrays = device_table.const_data_ptr<int64_t>() + first_array * groups;
    check_cublas(kernels::gemm_nt_grouped(handle, dtype, groups, counts.data(), p.n, p.k,
                                          reinterpret_cast<const void* const*>(arrays),
                                          reinterpret_cast<const void* const*>(arrays + groups),
                                          reinterpret_cast<void* const*>(arrays + 2 * groups)),
                 p.what);
  };
  project(gate_up_proj, 0);
  C10_CUDA_CHECK(kernels::launch_gated_activation(gate_up.data_ptr(), dtype, rows, ffn, act,
                                                  activated.data_ptr(), current_stream()));
  project(down_proj, 3);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { m.impl("expert_ffn", &expert_ffn_cuda); }

}  // namespace moe_ep::ops
