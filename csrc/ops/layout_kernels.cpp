#include "ops/layout_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>

#include <cstring>

#include "core/dispatch_layout.h"
#include "core/layout.h"

#ifdef MOE_EP_WITH_CUDA
#include "ops/cuda/common.h"
#endif

namespace moe_ep::ops {
namespace {

core::ExpertMap expert_map(const MapTensors& map) {
  return {map.slot_rank.data_ptr<int32_t>(),           map.slot_local.data_ptr<int32_t>(),
          static_cast<int32_t>(map.slot_rank.numel()), static_cast<int32_t>(map.world),
          static_cast<int32_t>(map.num_local),         static_cast<int32_t>(map.width)};
}

#ifdef MOE_EP_WITH_CUDA
static_assert(kMaxCudaSortKeys == kernels::kMaxSortKeys);

kernels::DispatchWorkspace cuda_workspace(const at::Tensor& ws, int64_t chunk, int64_t world) {
  auto* words = reinterpret_cast<unsigned long long*>(ws.data_ptr<int64_t>());
  return {words, words + 1, words + 2 + chunk * world};
}
#endif

// Each kernel records itself for the profiler (moe_ep.debug.op_counts), on both devices: the
// CPU CI counts the launches a GPU makes.

// The counting sort of rows x width keys (row stride `stride`) into offsets and position;
// with `skipped`, also the number of keys outside [0, num_keys) (int32 [1], zeroed here).
void counting_sort(const at::Tensor& keys, int64_t rows, int64_t width, int64_t stride,
                   int64_t num_keys, const at::Tensor& offsets, const at::Tensor& position,
                   const at::Tensor* skipped) {
  RECORD_FUNCTION("moe_ep::counting_sort", {});
#ifdef MOE_EP_WITH_CUDA
  if (keys.is_cuda()) {
    if (skipped != nullptr) skipped->zero_();
    at::Tensor scratch = at::empty(
        {kernels::counting_sort_scratch_ints(rows * width, static_cast<int32_t>(num_keys))},
        keys.options().dtype(at::kInt));
    C10_CUDA_CHECK(kernels::launch_counting_sort(
        keys.data_ptr<int32_t>(), rows, static_cast<int32_t>(width), stride,
        static_cast<int32_t>(num_keys), scratch.data_ptr<int32_t>(), offsets.data_ptr<int64_t>(),
        position.data_ptr<int32_t>(), skipped != nullptr ? skipped->data_ptr<int32_t>() : nullptr,
        current_stream()));
    return;
  }
#endif
  const int64_t count = core::stable_counting_sort(
      keys.data_ptr<int32_t>(), rows, static_cast<int32_t>(width), stride,
      static_cast<int32_t>(num_keys), offsets.data_ptr<int64_t>(), position.data_ptr<int32_t>());
  if (skipped != nullptr) skipped->fill_(count);
}

}  // namespace

Grouping group_by_key(const at::Tensor& keys, int64_t width, int64_t num_keys, bool count_skipped) {
  // One key per row ([T, 1], e.g. a transposed [1, T]) reads only stride(0).
  TORCH_INTERNAL_ASSERT(keys.scalar_type() == at::kInt &&
                        (keys.size(1) <= 1 || keys.stride(1) == 1));
  Grouping g{at::empty({num_keys + 1}, keys.options().dtype(at::kLong)),
             at::empty({keys.size(0), width}, keys.options()),
             count_skipped ? at::empty({1}, keys.options()) : at::Tensor()};
  counting_sort(keys, keys.size(0), width, keys.stride(0), num_keys, g.offsets, g.position,
                count_skipped ? &g.skipped : nullptr);
  return g;
}

at::Tensor scatter_rows(const at::Tensor& rows, const at::Tensor& position, int64_t out_rows) {
  RECORD_FUNCTION("moe_ep::scatter_rows", {});
  const at::Tensor src = rows.contiguous();
  at::Tensor out = at::empty({out_rows, src.size(1)}, src.options());
  const int64_t count = src.size(0), width = position.size(1);
  const int64_t row_bytes = src.size(1) * src.element_size();
#ifdef MOE_EP_WITH_CUDA
  if (src.is_cuda()) {
    C10_CUDA_CHECK(kernels::launch_permute_rows(src.data_ptr(), count, static_cast<int32_t>(width),
                                                row_bytes, position.data_ptr<int32_t>(),
                                                out.data_ptr(), current_stream()));
    return out;
  }
#endif
  const auto* from = static_cast<const char*>(src.data_ptr());
  auto* to = static_cast<char*>(out.data_ptr());
  const int32_t* places = position.data_ptr<int32_t>();
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t s = 0; s < width; ++s) {
        const int32_t place = places[r * width + s];
        if (place >= 0) std::memcpy(to + place * row_bytes, from + r * row_bytes, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor scatter_dequantized_rows(const at::Tensor& rows, const at::Tensor& scales,
                                    const at::Tensor& position, int64_t out_rows,
                                    at::ScalarType dtype) {
  RECORD_FUNCTION("moe_ep::scatter_dequantized_rows", {});
  TORCH_INTERNAL_ASSERT(rows.scalar_type() == at::kFloat8_e4m3fn && rows.is_contiguous() &&
                        scales.scalar_type() == at::kInt && scales.stride(1) == 1);
  at::Tensor out = at::empty({out_rows, rows.size(1)}, rows.options().dtype(dtype));
  const int64_t count = rows.size(0), hidden = rows.size(1), width = position.size(1);
  const auto* values = static_cast<const uint8_t*>(rows.data_ptr());
  const int32_t* scale_words = scales.data_ptr<int32_t>();
  const int32_t* places = position.data_ptr<int32_t>();
#ifdef MOE_EP_WITH_CUDA
  if (rows.is_cuda()) {
    C10_CUDA_CHECK(kernels::launch_scatter_dequantized(
        values, count, hidden, scale_words, scales.stride(0), static_cast<int32_t>(width), places,
        kernel_dtype(dtype), out.data_ptr(), current_stream()));
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scatter_dequantized", [&] {
    auto* to = out.data_ptr<scalar_t>();
    at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* first = nullptr;  // the row decoded once, copied to its other places
        for (int64_t s = 0; s < width; ++s) {
          const int32_t place = places[r * width + s];
          if (place < 0) continue;
          scalar_t* row = to + place * hidden;
          if (first == nullptr) {
            core::dequantize_row(
                values + r * hidden,
                reinterpret_cast<const uint8_t*>(scale_words + r * scales.stride(0)), hidden, row);
            first = row;
          } else {
            std::memcpy(row, first, hidden * sizeof(scalar_t));
          }
        }
      }
    });
  });
  return out;
}

at::Tensor dispatch_workspace(int64_t chunks, int64_t world, const at::TensorOptions& options) {
  return at::zeros({2 + chunks * world}, options.dtype(at::kLong));
}

SendLayout lay_out_send(const at::Tensor& topk_ids, const MapTensors& map, const at::Tensor& ws,
                        int64_t chunk, at::Tensor rank_offsets) {
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t tokens = ids.size(0), top_k = ids.size(1);
  const auto int_options = ids.options().dtype(at::kInt);
  SendLayout l{at::empty({tokens, top_k}, int_options), at::empty({tokens, top_k}, int_options),
               at::empty({tokens, top_k}, int_options), at::empty({tokens, top_k}, int_options),
               at::empty({tokens, top_k}, int_options), std::move(rank_offsets)};
  const core::ExpertMap m = expert_map(map);
  const core::TokenChoices out{l.dest_key.data_ptr<int32_t>(), l.owner.data_ptr<int32_t>(),
                               l.slot.data_ptr<int32_t>(), l.local.data_ptr<int32_t>()};
  {
    RECORD_FUNCTION("moe_ep::route_choices", {});
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "lay_out_send", [&] {
#ifdef MOE_EP_WITH_CUDA
      if (ids.is_cuda()) {
        C10_CUDA_CHECK(kernels::launch_route_choices(
            ids.data_ptr<index_t>(), tokens, static_cast<int32_t>(top_k), m, out,
            cuda_workspace(ws, chunk, map.world), chunk == 0, current_stream()));
        return;
      }
#endif
      int64_t* words = ws.data_ptr<int64_t>();
      words[0] |= core::route_choices(ids.data_ptr<index_t>(), tokens, static_cast<int32_t>(top_k),
                                      m, out, words + 2 + chunk * map.world);
      if (chunk == 0) words[1] = static_cast<int64_t>(core::map_checksum(m));
    });
  }
  counting_sort(l.dest_key, tokens * top_k, 1, 1, map.world, l.rank_offsets, l.position, nullptr);
  return l;
}

at::Tensor write_header(const at::Tensor& rank_offsets, const at::Tensor& ws, int64_t world,
                        int64_t config) {
  const auto chunks = static_cast<int32_t>(rank_offsets.size(0));
  RECORD_FUNCTION("moe_ep::write_header", {});
  at::Tensor header = at::empty({world, core::kHeaderSize}, ws.options());
  const int64_t* words = ws.data_ptr<int64_t>();
#ifdef MOE_EP_WITH_CUDA
  if (ws.is_cuda()) {
    const auto* w = reinterpret_cast<const unsigned long long*>(words);
    C10_CUDA_CHECK(kernels::launch_write_header(
        header.data_ptr<int64_t>(), static_cast<int32_t>(world), chunks,
        rank_offsets.data_ptr<int64_t>(), w + 2, w, w + 1, config, current_stream()));
    return header;
  }
#endif
  for (int64_t peer = 0; peer < world; ++peer) {
    core::write_header_row(header.data_ptr<int64_t>() + peer * core::kHeaderSize,
                           static_cast<int32_t>(peer), static_cast<int32_t>(world), chunks,
                           rank_offsets.data_ptr<int64_t>(), words + 2, config,
                           words[1] & static_cast<int64_t>(core::kChecksumMask), words[0]);
  }
  return header;
}

void write_status(at::Tensor& meta_send, int64_t status_column, int64_t capacity,
                  const at::Tensor& rank_offsets, const at::Tensor& ws, int64_t world,
                  int64_t config) {
  RECORD_FUNCTION("moe_ep::write_status", {});
  const int64_t* words = ws.data_ptr<int64_t>();
  const auto stride = static_cast<int32_t>(meta_send.stride(0));
#ifdef MOE_EP_WITH_CUDA
  if (ws.is_cuda()) {
    const auto* w = reinterpret_cast<const unsigned long long*>(words);
    C10_CUDA_CHECK(kernels::launch_write_status(
        meta_send.data_ptr<int32_t>(), stride, static_cast<int32_t>(status_column),
        static_cast<int32_t>(world), capacity, rank_offsets.data_ptr<int64_t>(), w, w + 1,
        static_cast<int32_t>(config), current_stream()));
    return;
  }
#endif
  const int64_t overflow =
      core::overflow_pairs(rank_offsets.data_ptr<int64_t>(), static_cast<int32_t>(world), capacity);
  for (int64_t rank = 0; rank < world; ++rank) {
    int32_t* status = meta_send.data_ptr<int32_t>() + rank * capacity * stride + status_column;
    status[core::kStatusOverflow] = static_cast<int32_t>(overflow);
    status[core::kStatusConfig] = static_cast<int32_t>(config);
    status[core::kStatusErrors] = static_cast<int32_t>(words[0]);
    status[core::kStatusMap] =
        static_cast<int32_t>(words[1] & static_cast<int64_t>(core::kChecksumMask));
  }
}

void pack_send(const at::Tensor& x, const at::Tensor& weights, const SendLayout& layout,
               int64_t capacity, int64_t width, at::Tensor& x_send, at::Tensor& meta_send,
               at::Tensor& token_slot) {
  const at::Tensor rows = x.contiguous();
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  RECORD_FUNCTION("moe_ep::pack", {});
  // The FP8 dispatch: its scales in the last columns of the metadata.
  const bool fp8 = x_send.scalar_type() == at::kFloat8_e4m3fn;
  const int64_t scale_column = meta_send.size(1) - core::fp8_scale_blocks(rows.size(1));
  const core::PackArgs args{static_cast<const uint8_t*>(rows.data_ptr()),
                            rows.size(1) * rows.element_size(),
                            w.data_ptr<float>(),
                            rows.size(0),
                            static_cast<int32_t>(layout.dest_key.size(1)),
                            layout.dest_key.data_ptr<int32_t>(),
                            layout.owner.data_ptr<int32_t>(),
                            layout.slot.data_ptr<int32_t>(),
                            layout.local.data_ptr<int32_t>(),
                            layout.position.data_ptr<int32_t>(),
                            layout.rank_offsets.data_ptr<int64_t>(),
                            capacity,
                            static_cast<int32_t>(width),
                            static_cast<int32_t>(meta_send.stride(0)),
                            static_cast<uint8_t*>(x_send.data_ptr()),
                            meta_send.data_ptr<int32_t>(),
                            token_slot.data_ptr<int32_t>(),
                            fp8 ? static_cast<int32_t>(scale_column) : -1};
#ifdef MOE_EP_WITH_CUDA
  if (rows.is_cuda()) {
    C10_CUDA_CHECK(
        fp8 ? kernels::launch_pack_fp8(args, kernel_dtype(rows.scalar_type()), current_stream())
            : kernels::launch_pack(args, current_stream()));
    return;
  }
#endif
  if (fp8) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "pack_fp8",
                                    [&] { core::pack_rows_fp8<scalar_t>(args); });
    return;
  }
  core::pack_rows(args);
}

}  // namespace moe_ep::ops
