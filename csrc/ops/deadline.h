// The deadline of the collectives moe_ep issues (docs/reliability.md): each one completes or
// raises within it on every rank that waits for it, instead of waiting for the process group's
// own timeout (30 minutes on Gloo, 10 on NCCL). It travels as the c10d options' timeout of
// every all-to-all, so the normal path adds no host read and no collective.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include <ATen/ATen.h>

namespace moe_ep::ops {

using Milliseconds = std::chrono::milliseconds;

// The deadline of a collective issued now by this thread: the thread's own (a layer's
// deadline, set around its step) when set, else the default.
Milliseconds collective_deadline();

// The default: 60 s, or MOE_EP_DEADLINE (seconds) from the environment at first use.
Milliseconds default_deadline();
void set_default_deadline(Milliseconds deadline);

// This thread's deadline (0: none, use the default); returns the one it replaces.
Milliseconds set_thread_deadline(Milliseconds deadline);

// Waits for a tensor whose collective was started by start_all_to_all_rows; a failure (a peer
// that closed its connection, a deadline passed) raises c10::DistBackendError naming the
// operation (moe_ep.deadline turns it into a CollectiveFailure naming the layer and ranks).
at::Tensor wait_collective(const at::Tensor& t, std::string_view operation);

// Raises the DistBackendError of wait_collective for a failure whose cause is `cause`.
[[noreturn]] void raise_collective_failure(std::string_view operation, std::string_view cause);

}  // namespace moe_ep::ops
