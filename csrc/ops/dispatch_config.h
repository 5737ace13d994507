// What the ranks of an expert-parallel group must agree on before rows move, and how a
// disagreement or a bad argument on one rank becomes an error on every rank instead of a
// rank left waiting in a collective (docs/dispatch.md, "Nobody waits forever").
//
// - Arguments are validated without raising: a rank with a malformed argument still takes
//   part in the exchange that decides the step, carrying the error, and every rank raises.
// - The exact mode compares a hash of the configuration in its per-step header (of the same
//   size for every configuration); only on a mismatch do the ranks exchange whole records, to
//   name the field.
// - The fixed-capacity mode reads nothing per step, so its collectives' sizes must be agreed
//   before its first transfer: a handshake once per (group, configuration), cached.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "ops/collectives.h"

namespace moe_ep::ops {

// The arguments a DispatchError's kBadArgument bits can name.
enum class Arg : int {
  kNone,
  kX,
  kTopkIds,
  kTopkWeights,
  kExpertRank,
  kExpertLocal,
  kNumLocalExperts,
  kNumChunks,
  kCapacity,
  kW13,
  kW2,
  kSlotCounts,
};

// The first malformed argument found on this rank, with the check's own message.
struct ArgProblem {
  Arg arg = Arg::kNone;
  std::string message;
  explicit operator bool() const { return arg != Arg::kNone; }
  int64_t error_bits() const;
};

// Runs check() (a TORCH_CHECK-style validation of `arg`) unless a problem was found already,
// and records its failure instead of raising.
template <typename Check>
void validate(ArgProblem& problem, Arg arg, Check&& check) {
  if (problem) return;
  try {
    check();
  } catch (const c10::Error& error) {
    problem = {arg, error.what_without_backtrace()};
  }
}

// Validates the arguments every dispatch over a group of `world` ranks takes.
void validate_dispatch_args(ArgProblem& problem, const at::Tensor& x, const at::Tensor& topk_ids,
                            const at::Tensor& topk_weights, const at::Tensor& expert_rank,
                            const at::Tensor& expert_local, int64_t num_local_experts,
                            int64_t world);

enum ConfigField : int {
  kConfigMode,  // 1 exact, 2 fixed capacity
  kConfigHidden,
  kConfigDtype,
  kConfigSlots,
  kConfigTopK,
  kConfigLocal,
  kConfigCapacity,
  kConfigChunks,
  kConfigSize,
};

struct DispatchConfig {
  std::array<int64_t, kConfigSize> fields{};
  // A 31-bit hash (it travels in int32 status words too).
  int64_t hash() const;
};

enum class Mode : int64_t { kExact = 1, kCapacity = 2 };

// The configuration of this rank's call, read from shapes only (a malformed argument gives -1
// fields: its problem is reported first).
DispatchConfig dispatch_config(Mode mode, const at::Tensor& x, const at::Tensor& topk_ids,
                               const at::Tensor& expert_rank, int64_t num_local_experts,
                               int64_t capacity, int64_t num_chunks);

// Raises for the DispatchError bits of rank `peer` (this rank's own problem has the
// detailed message).
void raise_for_errors(int64_t errors, int64_t peer, const Group& group, int64_t num_experts,
                      const ArgProblem& mine);

// Human-readable DispatchError bits (also for moe_ep.dispatcher.check_status), "" when none;
// num_experts <= 0 when the size of the expert map is not known.
std::string describe_errors(int64_t errors, int64_t num_experts);

// All ranks call this when the configuration hashes they exchanged differ: the whole records
// travel, and every rank raises naming the first field that differs.
[[noreturn]] void raise_config_mismatch(const Group& group, const DispatchConfig& mine);

// The fixed-capacity mode's handshake: the first call of a configuration on a group
// exchanges every rank's record (and argument problem) and raises on every rank on a
// mismatch; an agreed configuration is remembered, so later calls exchange nothing.
void agree_once(const Group& group, std::string_view group_name, const DispatchConfig& config,
                const ArgProblem& problem);

}  // namespace moe_ep::ops
