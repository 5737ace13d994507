// The collectives of expert parallelism over a torch.distributed process group resolved from
// its name (PyTorch's functional-collective idiom), and the communication stream they run on.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <optional>
#include <string>
#include <vector>

namespace moe_ep::ops {

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

// The process group registered as group_name; raises naming 'group_name' otherwise. (A rank
// whose name does not resolve cannot tell its peers: they wait in their first collective
// until its deadline.)
Group resolve_group(std::string_view group_name);

// The device a group's collectives use for tensors made by moe_ep itself (a header, a
// handshake): the given tensor's device where the group carries it, else the CPU (Gloo), else
// the current CUDA device (NCCL).
c10::Device collective_device(const Group& group, const c10::Device& preferred);

// Starts an all-to-all of the rows of `input`: variable row splits per rank, or equal splits
// when both lists are empty. The returned tensor is ready after wait_collective (deadline.h):
// its work is registered on it (the functional-collective idiom), so the caller computes
// meanwhile. The collective's timeout is the deadline (collective_deadline). A CUDA tensor on a
// group without a CUDA backend (several processes sharing one GPU) is staged through pinned
// host memory and completes before returning.
at::Tensor start_all_to_all_rows(const Group& group, const at::Tensor& input,
                                 std::vector<int64_t> send_rows, std::vector<int64_t> recv_rows);

// start_all_to_all_rows, waited for: the caller's stream (or, on the CPU, the caller) waits;
// a failure raises naming `operation`.
at::Tensor all_to_all_rows(std::string_view operation, const Group& group, const at::Tensor& input,
                           std::vector<int64_t> send_rows = {},
                           std::vector<int64_t> recv_rows = {});

// The same row to every peer, and every peer's row back: [world, n] from [n] (equal splits).
at::Tensor exchange_with_all(std::string_view operation, const Group& group, const at::Tensor& row);

// On CUDA, the work queued inside the scope runs on the device's communication stream (one
// per device, high priority), after the work already queued on the caller's stream (an event):
// a host read of a header then waits for the header's transfer, not for the expert GEMMs that
// the caller queued before. At exit the caller's stream waits for the scope's work (an event),
// and tensors handed over are marked as used on the caller's stream (record_stream), so that
// the caching allocator does not reuse them under it. On the CPU it does nothing.
class CommScope {
 public:
  explicit CommScope(const c10::Device& device);
  ~CommScope();
  CommScope(const CommScope&) = delete;
  CommScope& operator=(const CommScope&) = delete;

  // t was made inside the scope and is used on the caller's stream afterwards.
  void hand_over(const at::Tensor& t) const;

 private:
  std::optional<c10::Stream> caller_;
  std::optional<c10::StreamGuard> guard_;
};

}  // namespace moe_ep::ops
