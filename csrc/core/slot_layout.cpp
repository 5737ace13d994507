#include "core/slot_layout.h"

#include <algorithm>

namespace moe_ep::core {

bool SlotLayout::holds(int gpu, int expert) const {
  for (int slot : slots_of_gpu[gpu]) {
    if (slot_expert[slot] == expert) return true;
  }
  return false;
}

double SlotLayout::max_gpu_load() const {
  return gpu_load.empty() ? 0.0 : *std::max_element(gpu_load.begin(), gpu_load.end());
}

int SlotLayout::add(int expert, double load, int gpu) {
  const int slot = num_slots();
  slot_expert.push_back(expert);
  slot_load.push_back(load);
  slot_gpu.push_back(gpu);
  slots_of_gpu[gpu].push_back(slot);
  gpu_load[gpu] += load;
  return slot;
}

void SlotLayout::move(int slot, int gpu) {
  auto& from = slots_of_gpu[slot_gpu[slot]];
  from.erase(std::find(from.begin(), from.end(), slot));
  gpu_load[slot_gpu[slot]] -= slot_load[slot];
  slot_gpu[slot] = gpu;
  slots_of_gpu[gpu].push_back(slot);
  gpu_load[gpu] += slot_load[slot];
}

void SlotLayout::exchange(int x, int y) {
  const int gx = slot_gpu[x], gy = slot_gpu[y];
  *std::find(slots_of_gpu[gx].begin(), slots_of_gpu[gx].end(), x) = y;
  *std::find(slots_of_gpu[gy].begin(), slots_of_gpu[gy].end(), y) = x;
  const double shift = slot_load[x] - slot_load[y];
  gpu_load[gx] -= shift;
  gpu_load[gy] += shift;
  slot_gpu[x] = gy;
  slot_gpu[y] = gx;
}

void SlotLayout::relabel(const std::vector<int>& gpu_of) {
  std::vector<std::vector<int>> slots(slots_of_gpu.size());
  std::vector<double> load(gpu_load.size());
  for (int g = 0; g < num_gpus(); ++g) {
    slots[gpu_of[g]] = std::move(slots_of_gpu[g]);
    load[gpu_of[g]] = gpu_load[g];
  }
  slots_of_gpu = std::move(slots);
  gpu_load = std::move(load);
  sync_slot_gpus();
}

void SlotLayout::sync_slot_gpus() {
  for (int g = 0; g < num_gpus(); ++g) {
    for (int slot : slots_of_gpu[g]) slot_gpu[slot] = g;
  }
}

}  // namespace moe_ep::core
