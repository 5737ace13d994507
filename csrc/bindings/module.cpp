// The moe_ep._C module. Importing it also runs the static TORCH_LIBRARY registrations of
// csrc/ops, which make torch.ops.moe_ep.* available. No tensor crosses these bindings, so
// plain pybind11 serves: torch/extension.h would double this file's compile time.
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"
#include "core/fp8.h"
#include "moe_ep_build_info.h"  // MOE_EP_CUDA_TARGETS, written by setup.py
#include "ops/deadline.h"
#include "ops/dispatch_config.h"
#include "ops/host_reads.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_ep native core: torch.ops.moe_ep operators and the torch-free planners";
  m.attr("with_cuda") =
#ifdef MOE_EP_WITH_CUDA
      true;
#else
      false;
#endif
  m.attr("cuda_targets") = MOE_EP_CUDA_TARGETS;
  m.def("host_reads", &moe_ep::ops::host_reads,
        "Device-to-host reads made by moe_ep since import (moe_ep.debug.host_reads).");
  m.def("count_host_read", &moe_ep::ops::count_host_read,
        "Counts one host read made by moe_ep's Python code.");
  m.def(
      "describe_dispatch_errors",
      [](int64_t errors) { return moe_ep::ops::describe_errors(errors, /*num_experts=*/0); },
      "The misuse named by a dispatch status's error bits.");
  m.attr("fp8_block_size") = moe_ep::core::kFp8BlockSize;
  using Seconds = std::chrono::duration<double>;
  auto milliseconds = [](double seconds) {
    return std::chrono::duration_cast<moe_ep::ops::Milliseconds>(Seconds(seconds));
  };
  m.def(
      "default_deadline", [] { return Seconds(moe_ep::ops::default_deadline()).count(); },
      "The default deadline of moe_ep's collectives, in seconds (moe_ep.deadline).");
  m.def(
      "set_default_deadline",
      [=](double seconds) { moe_ep::ops::set_default_deadline(milliseconds(seconds)); },
      "Sets the default deadline of moe_ep's collectives, in seconds.");
  m.def(
      "set_thread_deadline",
      [=](double seconds) {
        return Seconds(moe_ep::ops::set_thread_deadline(milliseconds(seconds))).count();
      },
      "Sets this thread's deadline in seconds (0: the default); returns the previous one.");
  moe_ep::bindings::bind_placement(m);
  moe_ep::bindings::bind_perf(m);
}
