// Stable counting sort on the GPU (the contract of core::stable_counting_sort), in three small
// kernels over chunks of kChunk items:
//   1. count:  per-chunk histograms of the keys (shared-memory atomics);
//   2. scan:   per key, an exclusive scan over chunks plus the key's global offset;
//   3. rank:   one warp per chunk walks its items in order; __match_any_sync finds lanes with
//              the same key, so each item's rank keeps the input order (stability) without
//              global atomics.
// Up to kSmallSortItems items (a decode step's) the three phases run in one block instead:
// one launch, not three, where launch latency is what a step pays.
// Used by permute (expert ids), the dispatch sender (destination ranks) and the dispatch
// receiver (local expert ids of the received metadata, a strided column block).
#include "ops/kernels/launch.h"

namespace moe_ep::kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kChunk = 256;  // items per chunk: 8 warp-steps in the rank kernel
constexpr int kCountThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int64_t kSmallSortItems = 8192;
constexpr int kSmallSortThreads = 512;

int64_t num_chunks(int64_t num_items) { return (num_items + kChunk - 1) / kChunk; }

// Item i of a rows x width key table with rows `row_stride` apart; -1 (skipped) past the end
// and for keys outside [0, num_keys).
struct Keys {
  const int32_t* keys;
  int64_t num_items;
  int32_t width;
  int64_t row_stride;
  int32_t num_keys;

  __device__ int32_t operator()(int64_t i) const {
    if (i >= num_items) return -1;
    const int32_t key = keys[(i / width) * row_stride + i % width];
    return key >= 0 && key < num_keys ? key : -1;
  }
};

// Items first .. first + 31, one per lane of a warp, in order: each item's sorted position is
// its key's cursor plus the lanes below it with the same key (found by __match_any_sync,
// which keeps the input order: stability without global atomics); then the lowest of those
// lanes advances the cursor past them all.
__device__ void rank_warp_items(const Keys& keys, int64_t first, int lane, int32_t* cursor,
                                int32_t* __restrict__ position) {
  const int64_t i = first + lane;
  const int32_t key = keys(i);
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  if (i < keys.num_items) {
    position[i] = key >= 0 ? cursor[key] + __popc(peers & ((1u << lane) - 1u)) : -1;
  }
  __syncwarp();
  if (key >= 0 && lane == __ffs(peers) - 1) cursor[key] += __popc(peers);
  __syncwarp();
}

__global__ void count_kernel(Keys keys, int32_t* __restrict__ chunk_counts,
                             int32_t* __restrict__ skipped) {
  extern __shared__ int32_t histogram[];
  for (int k = threadIdx.x; k < keys.num_keys; k += blockDim.x) histogram[k] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  const int32_t key = keys(i);
  if (key >= 0) {
    atomicAdd(&histogram[key], 1);
  } else if (skipped != nullptr && i < keys.num_items) {
    atomicAdd(skipped, 1);
  }
  __syncthreads();
  int32_t* counts = chunk_counts + static_cast<int64_t>(blockIdx.x) * keys.num_keys;
  for (int k = threadIdx.x; k < keys.num_keys; k += blockDim.x) counts[k] = histogram[k];
}

// One block. chunk_counts[c][k] becomes the first sorted position of chunk c's items of key k.
__global__ void scan_kernel(int32_t* __restrict__ chunk_counts, int64_t chunks, int32_t num_keys,
                            int64_t* __restrict__ offsets) {
  extern __shared__ int64_t totals[];
  for (int k = threadIdx.x; k < num_keys; k += blockDim.x) {
    int64_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t& slot = chunk_counts[c * num_keys + k];
      const int32_t count = slot;
      slot = static_cast<int32_t>(running);
      running += count;
    }
    totals[k] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t offset = 0;
    for (int k = 0; k < num_keys; ++k) {
      const int64_t total = totals[k];
      totals[k] = offset;
      offsets[k] = offset;
      offset += total;
    }
    offsets[num_keys] = offset;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < num_keys; k += blockDim.x) {
    const auto base = static_cast<int32_t>(totals[k]);
    for (int64_t c = 0; c < chunks; ++c) chunk_counts[c * num_keys + k] += base;
  }
}

// One warp per chunk.
__global__ void rank_kernel(Keys keys, const int32_t* __restrict__ chunk_counts,
                            int32_t* __restrict__ position) {
  extern __shared__ int32_t cursor[];
  const int lane = threadIdx.x;
  const int32_t* starts = chunk_counts + static_cast<int64_t>(blockIdx.x) * keys.num_keys;
  for (int k = lane; k < keys.num_keys; k += kWarp) cursor[k] = starts[k];
  __syncwarp();
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kChunk;
  for (int step = 0; step < kChunk / kWarp; ++step) {
    rank_warp_items(keys, first + step * kWarp, lane, cursor, position);
  }
}

// The three phases in one block: counts in shared memory, the scan by the first thread, the
// ranks by the first warp walking the items in order (as rank_kernel does per chunk).
__global__ void small_sort_kernel(Keys keys, int64_t* __restrict__ offsets,
                                  int32_t* __restrict__ position, int32_t* __restrict__ skipped) {
  extern __shared__ int32_t cursor[];  // counts, then the running position of each key
  for (int k = threadIdx.x; k < keys.num_keys; k += blockDim.x) cursor[k] = 0;
  __syncthreads();
  int32_t local_skipped = 0;
  for (int64_t i = threadIdx.x; i < keys.num_items; i += blockDim.x) {
    const int32_t key = keys(i);
    if (key >= 0) {
      atomicAdd(&cursor[key], 1);
    } else {
      ++local_skipped;
    }
  }
  if (skipped != nullptr && local_skipped != 0) atomicAdd(skipped, local_skipped);
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t offset = 0;
    for (int k = 0; k < keys.num_keys; ++k) {
      const int32_t count = cursor[k];
      cursor[k] = offset;
      offsets[k] = offset;
      offset += count;
    }
    offsets[keys.num_keys] = offset;
  }
  __syncthreads();
  if (threadIdx.x >= kWarp) return;
  for (int64_t first = 0; first < keys.num_items; first += kWarp) {
    rank_warp_items(keys, first, threadIdx.x, cursor, position);
  }
}

}  // namespace

int64_t counting_sort_scratch_ints(int64_t num_items, int32_t num_keys) {
  return num_chunks(num_items) * num_keys;
}

cudaError_t launch_counting_sort(const int32_t* keys, int64_t rows, int32_t width,
                                 int64_t row_stride, int32_t num_keys, int32_t* scratch,
                                 int64_t* offsets, int32_t* position, int32_t* skipped,
                                 cudaStream_t stream) {
  const Keys table{keys, rows * width, width, row_stride, num_keys};
  const int64_t chunks = num_chunks(table.num_items);
  const size_t counts_bytes = num_keys * sizeof(int32_t);
  if (table.num_items <= kSmallSortItems) {
    small_sort_kernel<<<1, kSmallSortThreads, counts_bytes, stream>>>(table, offsets, position,
                                                                      skipped);
    return cudaGetLastError();
  }
  if (chunks > 0) {
    count_kernel<<<static_cast<unsigned>(chunks), kCountThreads, counts_bytes, stream>>>(
        table, scratch, skipped);
  }
  scan_kernel<<<1, kScanThreads, num_keys * sizeof(int64_t), stream>>>(scratch, chunks, num_keys,
                                                                       offsets);
  if (chunks > 0) {
    rank_kernel<<<static_cast<unsigned>(chunks), kWarp, counts_bytes, stream>>>(table, scratch,
                                                                                position);
  }
  return cudaGetLastError();
}

}  // namespace moe_ep::kernels
