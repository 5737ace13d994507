// The layout of an expert-parallel dispatch, per token: where each of its k choices goes, which
// choice owns the row that carries the token to a rank, and what travels in that row's
// metadata. Shared by the CPU ops (g++) and the CUDA kernels (nvcc), so both backends lay out
// the same rows; the whole protocol is drawn in docs/dispatch.md.
//
//   token t, choices j = 0..k-1            rank r receives one row per (token, rank)
//   ids[t, j] -> slot -> (rank, local)     meta row: local ids [W] | weights [W] (-1 / 0 padded)
//   first choice of t on r owns the row    W = min(k, local experts per rank)
#pragma once

#include <cstdint>
#include <cstring>

#include "core/common.h"
#include "core/fp8.h"
#include "core/routing.h"

namespace moe_ep::core {

// Misuse that a rank finds in its own dispatch arguments. The bits travel to every rank (in
// the exact mode's header, in the fixed-capacity status), so that all ranks raise together.
enum DispatchError : int64_t {
  kIdOutOfRange = 1,    // topk_ids: a slot id outside the expert map
  kTooManyChoices = 2,  // topk_ids: more choices of one token on a rank than the slot width
  kBadRank = 4,         // expert_rank: a rank outside the group
  kBadLocal = 8,        // expert_local: a local id outside [0, num_local_experts)
  kBadArgument = 16,    // a malformed argument (shape, dtype, device); bits 8.. name it
};
constexpr int kBadArgumentShift = 8;

// The expert map of a dispatch: slot s lives on rank slot_rank[s] as its local expert
// slot_local[s]. width: metadata slots per row, min(top_k, num_local).
struct ExpertMap {
  const int32_t* slot_rank;
  const int32_t* slot_local;
  int32_t num_slots;
  int32_t world;
  int32_t num_local;
  int32_t width;
};

// One token's choices. For choice j: dest_key[j] is its rank when j is the token's first
// choice there (j owns the row sent to that rank), else -1; owner[j] is the choice that owns
// the row of j's rank; slot[j] is j's place in that row's metadata (< width); local[j] is the
// receiver-local expert id. Returns the DispatchError bits found; out-of-range values are
// clamped so that every index stays in bounds.
template <typename Id>
MOE_EP_HD inline int64_t route_token_choices(const Id* ids, int32_t top_k, const ExpertMap& map,
                                             int32_t* dest_key, int32_t* owner, int32_t* slot,
                                             int32_t* local) {
  int32_t dest[kMaxTopK];
  int64_t errors = 0;
  for (int32_t j = 0; j < top_k; ++j) {
    auto id = static_cast<int64_t>(ids[j]);
    if (id < 0 || id >= map.num_slots) {
      errors |= kIdOutOfRange;
      id = 0;
    }
    int32_t rank = map.slot_rank[id];
    if (rank < 0 || rank >= map.world) {
      errors |= kBadRank;
      rank = rank < 0 ? 0 : map.world - 1;
    }
    int32_t local_id = map.slot_local[id];
    if (local_id < 0 || local_id >= map.num_local) {
      errors |= kBadLocal;
      local_id = local_id < 0 ? 0 : map.num_local - 1;
    }
    int32_t first = j, place = 0;
    for (int32_t i = 0; i < j; ++i) {
      if (dest[i] != rank) continue;
      if (place == 0) first = i;
      ++place;
    }
    if (place >= map.width) {
      errors |= kTooManyChoices;
      place = map.width - 1;
    }
    dest[j] = rank;
    dest_key[j] = first == j ? rank : -1;
    owner[j] = first;
    slot[j] = place;
    local[j] = local_id;
  }
  return errors;
}

// A slot's contribution to the map checksum that ranks compare every step (a placement that
// changed on one rank only would send tokens to the wrong experts, silently). The checksum is
// the sum of all contributions modulo 2^31: order-free to add, so a kernel can use atomics.
MOE_EP_HD inline uint64_t map_checksum_term(int64_t slot, int32_t rank, int32_t local) {
  // splitmix64's finaliser over (slot, rank, local).
  uint64_t h = static_cast<uint64_t>(slot) * 0x9E3779B97F4A7C15ull +
               static_cast<uint64_t>(rank) * 0xD6E8FEB86659FD93ull + static_cast<uint64_t>(local);
  h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
  h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
  return h ^ (h >> 31);
}
constexpr uint64_t kChecksumMask = 0x7fffffffull;

// The row that carries (token, rank) when the sender's sort placed it at `position` (rows of
// rank r start at rank_offsets[r]): the same row in the exact mode (capacity 0); block r of
// `capacity` rows in the fixed-capacity mode, or -1 when the block is full.
MOE_EP_HD inline int64_t send_row(int64_t position, int32_t rank, const int64_t* rank_offsets,
                                  int64_t capacity) {
  if (capacity == 0) return position;
  const int64_t within = position - rank_offsets[rank];
  return within < capacity ? rank * capacity + within : -1;
}

// The exact mode's header: one row of int64 per peer, of the same size for every
// configuration, so that ranks that disagree still exchange it safely before anything whose
// size depends on the configuration. Per chunk: the rows and the (row, expert) entries sent.
constexpr int kMaxChunks = 16;
enum HeaderField : int {
  kHeaderConfig,  // hash of the configuration (hidden size, dtype, map size, k, ...)
  kHeaderMap,     // map checksum
  kHeaderErrors,  // DispatchError bits of the sender's arguments
  kHeaderChunks,  // chunk count
  kHeaderCounts,  // then (rows, entries) per chunk
  kHeaderSize = kHeaderCounts + 2 * kMaxChunks,
};

// The fixed-capacity status (int32), sent in the metadata of the first row of every block:
// the same values from a source to every rank, so every rank sees the same [world, size].
enum StatusField : int {
  kStatusOverflow,  // (token, rank) pairs over capacity, not sent
  kStatusConfig,    // hash of the configuration
  kStatusErrors,    // DispatchError bits
  kStatusMap,       // map checksum
  kStatusSize,
};

// (token, rank) pairs that do not fit in blocks of `capacity` rows.
MOE_EP_HD inline int64_t overflow_pairs(const int64_t* rank_offsets, int32_t world,
                                        int64_t capacity) {
  int64_t over = 0;
  for (int32_t r = 0; r < world; ++r) {
    const int64_t rows = rank_offsets[r + 1] - rank_offsets[r];
    if (rows > capacity) over += rows - capacity;
  }
  return over;
}

// Header row for `peer` from the sender's per-chunk rank offsets ([chunks][world + 1]) and
// entries per rank ([chunks][world]).
MOE_EP_HD inline void write_header_row(int64_t* row, int32_t peer, int32_t world, int32_t chunks,
                                       const int64_t* rank_offsets, const int64_t* entries,
                                       int64_t config, int64_t checksum, int64_t errors) {
  row[kHeaderConfig] = config;
  row[kHeaderMap] = checksum;
  row[kHeaderErrors] = errors;
  row[kHeaderChunks] = chunks;
  for (int32_t c = 0; c < kMaxChunks; ++c) {
    const bool used = c < chunks;
    const int64_t* offsets = rank_offsets + static_cast<int64_t>(c) * (world + 1);
    row[kHeaderCounts + 2 * c] = used ? offsets[peer + 1] - offsets[peer] : 0;
    row[kHeaderCounts + 2 * c + 1] = used ? entries[static_cast<int64_t>(c) * world + peer] : 0;
  }
}

// CPU versions of the layout kernels (csrc/ops/kernels/dispatch_layout.cu runs the same
// per-token functions on the GPU).

struct TokenChoices {
  int32_t* dest_key;  // [T * k]
  int32_t* owner;     // [T * k]
  int32_t* slot;      // [T * k]
  int32_t* local;     // [T * k]
};

// Every token's choices; adds the (token, choice) pairs sent to each rank to entries[world].
// Returns the DispatchError bits.
template <typename Id>
int64_t route_choices(const Id* ids, int64_t num_tokens, int32_t top_k, const ExpertMap& map,
                      const TokenChoices& out, int64_t* entries);

uint64_t map_checksum(const ExpertMap& map);

// Packs the send rows: x's row of every (token, rank) pair that has a row (send_row), its
// metadata row (local ids then float32 weight bits, -1 / 0 padded, `meta_stride` int32 per
// row), and token_slot[T * k]: the row of each choice that owns one, else -1. The FP8 dispatch
// (scale_column >= 0) sends x's row as e4m3fn codes (x_send rows of `hidden` bytes) and its
// block scales (fp8.h) in the metadata row from scale_column on.
struct PackArgs {
  const uint8_t* x;
  int64_t row_bytes;
  const float* weights;  // [T * k]
  int64_t num_tokens;
  int32_t top_k;
  const int32_t* dest_key;
  const int32_t* owner;
  const int32_t* slot;
  const int32_t* local;
  const int32_t* position;      // the sender's sort of dest_key
  const int64_t* rank_offsets;  // [world + 1], from the same sort
  int64_t capacity;             // 0: exact mode
  int32_t width;
  int32_t meta_stride;
  uint8_t* x_send;
  int32_t* meta_send;
  int32_t* token_slot;
  int32_t scale_column = -1;
};

// The metadata and token_slot entries of token t (both backends); returns nothing, the row
// copies are the caller's (they differ: memcpy on the CPU, vector loads on the GPU).
MOE_EP_HD inline void pack_token_metadata(const PackArgs& a, int64_t t) {
  const int64_t base = t * a.top_k;
  for (int32_t j = 0; j < a.top_k; ++j) {
    const int32_t rank = a.dest_key[base + j];
    a.token_slot[base + j] = rank < 0 ? -1
                                      : static_cast<int32_t>(send_row(a.position[base + j], rank,
                                                                      a.rank_offsets, a.capacity));
  }
  for (int32_t j = 0; j < a.top_k; ++j) {
    const int32_t row = a.token_slot[base + a.owner[base + j]];
    if (row < 0) continue;
    int32_t* meta = a.meta_send + static_cast<int64_t>(row) * a.meta_stride;
    if (a.owner[base + j] == j) {  // first choice on this rank: clear the row's slots
      for (int32_t s = 0; s < a.width; ++s) {
        meta[s] = -1;
        meta[a.width + s] = 0;
      }
    }
    meta[a.slot[base + j]] = a.local[base + j];
    float weight = a.weights[base + j];
    int32_t bits;
    static_assert(sizeof(bits) == sizeof(weight), "weights travel as int32 bits");
    memcpy(&bits, &weight, sizeof(bits));
    meta[a.width + a.slot[base + j]] = bits;
  }
}

void pack_rows(const PackArgs& args);

// pack_rows for the FP8 dispatch, x of element type T: each token's row is quantized once,
// into its first send row, and copied with its scales to the other ranks it goes to.
template <typename T>
void pack_rows_fp8(const PackArgs& a) {
  const int64_t hidden = a.row_bytes / static_cast<int64_t>(sizeof(T));
  const int64_t scale_bytes = fp8_scale_blocks(hidden) * static_cast<int64_t>(sizeof(float));
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    pack_token_metadata(a, t);
    const uint8_t *first_values = nullptr, *first_scales = nullptr;
    for (int32_t j = 0; j < a.top_k; ++j) {
      const int64_t pair = t * a.top_k + j;
      const int32_t row = a.dest_key[pair] < 0 ? -1 : a.token_slot[pair];
      if (row < 0) continue;
      uint8_t* values = a.x_send + row * hidden;
      auto* scales = reinterpret_cast<uint8_t*>(
          a.meta_send + static_cast<int64_t>(row) * a.meta_stride + a.scale_column);
      if (first_values == nullptr) {
        quantize_row(reinterpret_cast<const T*>(a.x) + t * hidden, hidden, values, scales);
        first_values = values;
        first_scales = scales;
      } else {
        std::memcpy(values, first_values, hidden);
        std::memcpy(scales, first_scales, scale_bytes);
      }
    }
  }
}

}  // namespace moe_ep::core
