// The layout kernels of permute and dispatch on tensors: one entry point per kernel, CPU
// through the torch-free core (csrc/core/layout, csrc/core/dispatch_layout), CUDA through
// csrc/ops/kernels/. None reads anything on the host; the callers decide what to read.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moe_ep::ops {

// Keys a sort can have on CUDA (its kernels keep per-key state in shared memory): the experts
// of permute, the ranks of a dispatch group, the local experts of a rank.
constexpr int64_t kMaxCudaSortKeys = 4096;

// Stable grouping of the first `width` columns of the int32 table `keys` [rows, >= width] by
// key: offsets int64 [num_keys + 1] and position int32 [rows, width] (-1 for keys outside
// [0, num_keys)), both on keys' device; with count_skipped, `skipped` (int32 [1], same
// device) counts those.
struct Grouping {
  at::Tensor offsets;
  at::Tensor position;
  at::Tensor skipped;
};
Grouping group_by_key(const at::Tensor& keys, int64_t width, int64_t num_keys, bool count_skipped);

// rows [R, H] scattered to a new [out_rows, H] tensor: out[position[r, s]] = rows[r] for every
// position >= 0. Rows of the output that no position names are left unwritten.
at::Tensor scatter_rows(const at::Tensor& rows, const at::Tensor& position, int64_t out_rows);

// scatter_rows of the FP8 dispatch's rows (float8_e4m3fn [R, H]) dequantized to `dtype` on the
// way, in one pass: each row is decoded once, with its block scales (core/fp8.h), float32 bits
// in the int32 columns `scales` [R, ceil(H / 128)] (a view of the metadata, row stride free).
at::Tensor scatter_dequantized_rows(const at::Tensor& rows, const at::Tensor& scales,
                                    const at::Tensor& position, int64_t out_rows,
                                    at::ScalarType dtype);

// Zeroed counters of a dispatch of `chunks` chunks (int64): misuse bits, map checksum, then
// (token, choice) pairs per rank of every chunk.
at::Tensor dispatch_workspace(int64_t chunks, int64_t world, const at::TensorOptions& options);

// The expert map as the kernels see it.
struct MapTensors {
  at::Tensor slot_rank;   // int32 [P], contiguous
  at::Tensor slot_local;  // int32 [P], contiguous
  int64_t world, num_local, width;
};

// One chunk's choices (route_token_choices for every token) and their grouping by
// destination rank; accumulates into chunk `chunk` of the workspace (the checksum with the
// first chunk only). rank_offsets: int64 [world + 1] written in place.
struct SendLayout {
  at::Tensor dest_key, owner, slot, local;  // int32 [T, k]
  at::Tensor position;                      // int32 [T, k]: the sort of dest_key
  at::Tensor rank_offsets;                  // int64 [world + 1]
};
SendLayout lay_out_send(const at::Tensor& topk_ids, const MapTensors& map, const at::Tensor& ws,
                        int64_t chunk, at::Tensor rank_offsets);

// The exact mode's header [world, kHeaderSize] from every chunk's rank offsets
// [chunks, world + 1] and the workspace.
at::Tensor write_header(const at::Tensor& rank_offsets, const at::Tensor& ws, int64_t world,
                        int64_t config);

// The fixed-capacity status of this rank written into the first metadata row of each block.
void write_status(at::Tensor& meta_send, int64_t status_column, int64_t capacity,
                  const at::Tensor& rank_offsets, const at::Tensor& ws, int64_t world,
                  int64_t config);

// The send rows of one chunk: x's rows and their metadata (meta_send's first 2W columns), and
// token_slot. capacity 0: the exact mode's rows (rank_offsets order); else blocks of capacity.
// An x_send of float8_e4m3fn is the FP8 dispatch: x's rows quantized in the same pass, their
// scales in meta_send's last ceil(H / 128) columns.
void pack_send(const at::Tensor& x, const at::Tensor& weights, const SendLayout& layout,
               int64_t capacity, int64_t width, at::Tensor& x_send, at::Tensor& meta_send,
               at::Tensor& token_slot);

}  // namespace moe_ep::ops
