#include "ops/collectives.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <algorithm>
#include <array>
#include <mutex>

#include "ops/deadline.h"

namespace moe_ep::ops {
namespace {

bool group_carries(const Group& group, c10::DeviceType type) {
  const auto devices = group->getDeviceTypes();
  return std::any_of(devices.begin(), devices.end(),
                     [&](const c10::Device& d) { return d.type() == type; });
}

// The communication stream of a CUDA device, made once.
c10::Stream comm_stream(const c10::Device& device) {
  static std::mutex mutex;
  static std::array<std::optional<c10::Stream>, 64> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto& stream = streams.at(device.index());
  if (!stream) {
    stream = c10::impl::getDeviceGuardImpl(device.type())
                 ->getStreamFromGlobalPool(device, /*isHighPriority=*/true);
  }
  return *stream;
}

}  // namespace

Group resolve_group(std::string_view group_name) {
  const std::string name(group_name);
  TORCH_CHECK(c10d::is_process_group_registered(name),
              "moe_ep: argument 'group_name': ", "no process group is registered as \"", name,
              "\"");
  return c10d::resolve_process_group(name);
}

c10::Device collective_device(const Group& group, const c10::Device& preferred) {
  if (group_carries(group, preferred.type())) return preferred;
  if (group_carries(group, c10::DeviceType::CPU)) return c10::Device(c10::DeviceType::CPU);
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice();
}

at::Tensor start_all_to_all_rows(const Group& group, const at::Tensor& input,
                                 std::vector<int64_t> send_rows, std::vector<int64_t> recv_rows) {
  if (input.scalar_type() == at::kFloat8_e4m3fn) {
    // Gloo has no FP8 type: the rows travel as bytes (the work is registered on the storage,
    // which the FP8 view shares).
    return start_all_to_all_rows(group, input.view(at::kByte), std::move(send_rows),
                                 std::move(recv_rows))
        .view(at::kFloat8_e4m3fn);
  }
  std::vector<int64_t> shape = input.sizes().vec();
  if (!recv_rows.empty()) {
    shape[0] = 0;
    for (const int64_t n : recv_rows) shape[0] += n;
  }
  at::Tensor send = input.contiguous();
  const bool stage = !group_carries(group, input.device().type());
  TORCH_CHECK(!stage || (input.is_cuda() && group_carries(group, c10::DeviceType::CPU)),
              "moe_ep: the process group (backend ", group->getBackendName(), ") cannot carry ",
              input.device().type(), " tensors");
  if (stage) {
    at::Tensor host =
        at::empty(send.sizes(), send.options().device(at::kCPU).pinned_memory(input.is_cuda()));
    send = host.copy_(send);
  }
  at::Tensor recv = at::empty(shape, send.options());
  c10d::AllToAllOptions options;
  options.timeout = collective_deadline();
  c10::intrusive_ptr<c10d::Work> work;
  try {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    // alltoall_base: the name that every torch >= 2.4 has (newer ones alias it).
    work = group->alltoall_base(recv, send, recv_rows, send_rows, options);
#pragma GCC diagnostic pop
    if (stage) work->wait();
  } catch (const std::exception& error) {  // a group that failed before refuses new work
    raise_collective_failure("an all-to-all", error.what());
  }
  if (stage) return recv.to(input.device());
  c10d::register_work(recv, work);
  return recv;
}

at::Tensor all_to_all_rows(std::string_view operation, const Group& group, const at::Tensor& input,
                           std::vector<int64_t> send_rows, std::vector<int64_t> recv_rows) {
  return wait_collective(
      start_all_to_all_rows(group, input, std::move(send_rows), std::move(recv_rows)), operation);
}

at::Tensor exchange_with_all(std::string_view operation, const Group& group,
                             const at::Tensor& row) {
  return all_to_all_rows(operation, group,
                         row.unsqueeze(0).expand({group->getSize(), row.numel()}));
}

CommScope::CommScope(const c10::Device& device) {
  if (device.type() != c10::DeviceType::CUDA) return;
  const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
  caller_ = impl->getStream(device);
  const c10::Stream comm = comm_stream(device);
  c10::Event inputs_ready(device.type());
  inputs_ready.record(*caller_);
  inputs_ready.block(comm);
  guard_.emplace(comm);
}

CommScope::~CommScope() {
  if (!caller_) return;
  c10::Event done(caller_->device_type());
  done.record(guard_->current_stream());
  done.block(*caller_);
}

void CommScope::hand_over(const at::Tensor& t) const {
  if (caller_ && t.defined() && t.is_cuda()) t.record_stream(*caller_);
}

}  // namespace moe_ep::ops
