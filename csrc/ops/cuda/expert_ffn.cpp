// expert_ffn on CUDA: the gate/up projection, one fused activation kernel, then the down
// projection, over the rows below expert_offsets[E] only.
//
// MOE_EP_EXPERT_GEMM, read on every call, picks how the projections run:
//   auto (the default, also when unset or empty): grouped_mm where its fast path applies,
//       else per_expert. This follows torch's rules, not a measurement: a GPU run of
//       benchmarks/bench_local.py, which times every variant side by side, must confirm it.
//   grouped_mm: at::_grouped_mm over the int32 row ends offsets[1:], which stay on the device:
//       no host read, so it captures in a CUDA graph. Its CUTLASS path (torch's
//       aten/src/ATen/native/cuda/GroupedBlas.cpp and GroupMM.cu) takes bf16 on compute
//       capability 9.x or 10.x, fewer than 1024 experts and 16-byte aligned rows and pointers;
//       torch's other path reads the offsets on the host, so such calls take per_expert.
//   per_expert: one cublasGemmEx per non-empty expert and projection.
//   cublas_grouped: one cublasGemmGroupedBatchedEx per projection (a call whose matrices are
//       not all 16-byte aligned takes per_expert).
// cuBLAS takes its sizes from the host: CPU offsets are used as they are, device offsets cost
// one counted device-to-host read (moe_ep.debug.host_reads()). check_offsets=True validates
// device offsets in that same read; with grouped_mm and check_offsets=False nothing is read.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "ops/cuda/common.h"
#include "ops/expert_ffn.h"

namespace moe_ep::ops {
namespace {

constexpr const char* kGemmVariable = "MOE_EP_EXPERT_GEMM";

enum class ExpertGemm { kAuto, kGroupedMm, kPerExpert, kCublasGrouped };

ExpertGemm expert_gemm_from_env() {
  const char* raw = std::getenv(kGemmVariable);
  const std::string_view value = raw == nullptr ? std::string_view() : std::string_view(raw);
  if (value.empty() || value == "auto") return ExpertGemm::kAuto;
  if (value == "grouped_mm") return ExpertGemm::kGroupedMm;
  if (value == "per_expert") return ExpertGemm::kPerExpert;
  TORCH_CHECK(value == "cublas_grouped", "moe_ep: environment variable ", kGemmVariable,
              " must be \"auto\" (the default), \"grouped_mm\", \"per_expert\" or ",
              "\"cublas_grouped\", got \"", value, "\"");
  return ExpertGemm::kCublasGrouped;
}

bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether at::_grouped_mm runs its CUTLASS path, which reads no offset on the host, for these
// contiguous operands ([N, H], [E, 2F, H], [E, H, F]). Row operands stay under 2^31 elements:
// past that, torchtitan issue 1932 reports illegal memory accesses (cause not yet known).
bool grouped_mm_applies(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2) {
  if (x.scalar_type() != at::kBFloat16) return false;
  const int major = at::cuda::getDeviceProperties(x.device().index())->major;
  const int64_t per_16_bytes = 16 / x.element_size();
  const int64_t widest_row = std::max(x.size(1), w13.size(1));  // H or 2F
  return (major == 9 || major == 10) && w13.size(0) < 1024 &&
         x.size(0) * widest_row <= std::numeric_limits<int32_t>::max() &&
         x.size(1) % per_16_bytes == 0 && w2.size(2) % per_16_bytes == 0 &&
         aligned_16(x.const_data_ptr()) && aligned_16(w13.const_data_ptr()) &&
         aligned_16(w2.const_data_ptr());
}

// The values on `device`, copied on the current stream without waiting: written into a pinned
// host tensor first. That tensor is freed when the caller returns, but the caching host
// allocator records the copy's stream and reuses the pinned block only once the copy has
// completed (and never, for a block used in a CUDA graph capture).
template <typename T>
at::Tensor to_device_async(const std::vector<T>& values, at::ScalarType dtype, at::Device device) {
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(dtype).pinned_memory(true));
  TORCH_INTERNAL_ASSERT(host.element_size() == sizeof(T));
  std::memcpy(host.data_ptr(), values.data(), values.size() * sizeof(T));
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

// The FFN over two at::_grouped_mm calls. Device offsets stay on the device: their int32 ends
// are converted there, and offsets[E] bounds the activation's rows from the device.
at::Tensor grouped_mm_ffn(const at::Tensor& x, const at::Tensor& expert_offsets,
                          const std::optional<std::vector<int64_t>>& host_offsets,
                          const at::Tensor& w13, const at::Tensor& w2, Activation act) {
  const int64_t experts = w13.size(0), ffn = w2.size(2);
  at::Tensor ends;
  int64_t rows = x.size(0);
  const int64_t* row_bound = nullptr;
  if (expert_offsets.is_cpu()) {
    ends = to_device_async(std::vector<int32_t>(host_offsets->begin() + 1, host_offsets->end()),
                           at::kInt, x.device());
    rows = host_offsets->back();
  } else {
    ends = expert_offsets.narrow(0, 1, experts).to(at::kInt);
    row_bound = expert_offsets.const_data_ptr<int64_t>() + experts * expert_offsets.stride(0);
  }
  const at::Tensor gate_up = at::_grouped_mm(x, w13.transpose(1, 2), ends);
  // torch pads the output's rows to 16 bytes; 2F elements are a multiple of that here.
  TORCH_INTERNAL_ASSERT(gate_up.is_contiguous());
  at::Tensor activated = at::empty({x.size(0), ffn}, x.options());
  C10_CUDA_CHECK(kernels::launch_gated_activation(
      gate_up.const_data_ptr(), kernel_dtype(x.scalar_type()), rows, ffn, act, row_bound,
      activated.data_ptr(), current_stream()));
  return at::_grouped_mm(activated, w2.transpose(1, 2), ends);
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

// The FFN over cuBLAS with sizes from the host: per expert, or grouped (cublas_grouped).
at::Tensor cublas_ffn(const at::Tensor& x, const std::vector<int64_t>& offsets,
                      const at::Tensor& w13, const at::Tensor& w2, Activation act,
                      bool grouped_requested) {
  const int64_t rows = offsets.back(), hidden = x.size(1), ffn = w2.size(2);
  at::Tensor out = at::empty({x.size(0), hidden}, x.options());
  if (rows == 0) return out;
  at::Tensor gate_up = at::empty({rows, 2 * ffn}, x.options());
  at::Tensor activated = at::empty({rows, ffn}, x.options());
  const kernels::DType dtype = kernel_dtype(x.scalar_type());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  std::vector<ExpertRows> experts;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] > offsets[e])
      experts.push_back({static_cast<int64_t>(e), offsets[e], offsets[e + 1] - offsets[e]});
  }
  const Projection gate_up_proj{x, w13, gate_up, 2 * ffn, hidden, "gate/up GEMM"};
  const Projection down_proj{activated, w2, out, hidden, ffn, "down GEMM"};

  std::vector<int64_t> table;  // grouped: the pointer arrays of both projections
  if (grouped_requested) {
    table.reserve(6 * experts.size());
    append_pointers(gate_up_proj, experts, table);
    append_pointers(down_proj, experts, table);
    // cuBLAS documents alignment rules for the matrix pointers of the fp16/bf16 grouped GEMM
    // (a misaligned one faults on the device); 16-byte alignment of every pointer satisfies
    // them all. A call that misses it, whatever its dtype (rows whose size in bytes is not a
    // multiple of 16, views at an odd offset), takes the per-expert path instead.
    for (const int64_t ptr : table) {
      if (!aligned_16(reinterpret_cast<const void*>(ptr))) {
        table.clear();
        break;
      }
    }
  }
  const bool grouped = !table.empty();

  // The pointer arrays must be in device memory.
  static_assert(sizeof(int64_t) == sizeof(void*), "pointers are stored as int64");
  const auto groups = static_cast<int64_t>(experts.size());
  std::vector<int64_t> counts;
  at::Tensor device_table;
  if (grouped) {
    device_table = to_device_async(table, at::kLong, x.device());
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
                                                  /*row_bound=*/nullptr, activated.data_ptr(),
                                                  current_stream()));
  project(down_proj, 3);
  return out;
}

at::Tensor expert_ffn_cuda(const at::Tensor& x, const at::Tensor& expert_offsets,
                           const at::Tensor& w13, const at::Tensor& w2, std::string_view activation,
                           bool check_offsets) {
  const Activation act = check_expert_ffn_args(x, expert_offsets, w13, w2, activation);
  TORCH_CHECK(x.is_cuda(), "moe_ep: argument 'x' must be a CUDA tensor");
  const ExpertGemm gemm = expert_gemm_from_env();
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor input = x.contiguous(), gate_up_w = w13.contiguous(), down_w = w2.contiguous();
  const bool use_grouped_mm = (gemm == ExpertGemm::kAuto || gemm == ExpertGemm::kGroupedMm) &&
                              grouped_mm_applies(input, gate_up_w, down_w);
  // Host offsets: free from a CPU tensor; from the device only to validate them or for cuBLAS.
  std::optional<std::vector<int64_t>> host_offsets;
  if (expert_offsets.is_cpu() || check_offsets || !use_grouped_mm)
    host_offsets = checked_host_offsets(expert_offsets, input.size(0));
  if (input.size(0) == 0 || gate_up_w.size(0) == 0)
    return at::empty({input.size(0), input.size(1)}, input.options());
  if (use_grouped_mm)
    return grouped_mm_ffn(input, expert_offsets, host_offsets, gate_up_w, down_w, act);
  return cublas_ffn(input, *host_offsets, gate_up_w, down_w, act,
                    gemm == ExpertGemm::kCublasGrouped);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ep, CUDA, m) { m.impl("expert_ffn", &expert_ffn_cuda); }

}  // namespace moe_ep::ops
