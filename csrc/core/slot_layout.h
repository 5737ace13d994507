// The slots of one MoE layer on GPUs: the state that every planning step reads and changes.
// Before the node step the "GPUs" are bins that get their real GPU later (relabel()).
#pragma once

#include <vector>

namespace moe_ep::core {

struct SlotLayout {
  std::vector<int> slot_expert;                // slot -> logical expert
  std::vector<double> slot_load;               // slot -> load per replica of its expert
  std::vector<int> slot_gpu;                   // slot -> GPU
  std::vector<std::vector<int>> slots_of_gpu;  // GPU -> its slots
  std::vector<double> gpu_load;                // GPU -> sum of its slots' loads

  explicit SlotLayout(int num_gpus = 0) : slots_of_gpu(num_gpus), gpu_load(num_gpus, 0.0) {}

  int num_gpus() const { return static_cast<int>(slots_of_gpu.size()); }
  int num_slots() const { return static_cast<int>(slot_expert.size()); }
  bool holds(int gpu, int expert) const;
  double max_gpu_load() const;
  // A new slot of `expert` (load per replica `load`) on `gpu`; returns its id.
  int add(int expert, double load, int gpu);
  // Moves slot s to `gpu` (its old GPU keeps one slot less).
  void move(int slot, int gpu);
  // Slots x and y trade GPUs.
  void exchange(int x, int y);
  // Renames GPU g to gpu_of[g] (a permutation), e.g. bins to the GPUs the node step chose.
  void relabel(const std::vector<int>& gpu_of);
  // slot_gpu from slots_of_gpu, after a step that edits the lists directly.
  void sync_slot_gpus();
};

}  // namespace moe_ep::core
