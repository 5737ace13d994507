// The dispatch layout on the GPU: the same per-token functions as the CPU path
// (core/dispatch_layout.h), in a few kernels per chunk (docs/dispatch.md counts them):
//   route_choices:  one thread per token: destinations, owners, slots, local ids; entries per
//                   rank (block histograms), misuse bits, the map checksum (threads < slots);
//   (the counting sort of the destinations: counting_sort.cu)
//   write_header:   the exact mode's header, one thread per peer;
//   write_status:   the fixed-capacity status, in the first metadata row of every block;
//   pack:           one block per token: its metadata, then its row to each rank it goes to.
#include "core/dispatch_layout.h"
#include "ops/kernels/dtype.cuh"

namespace moe_ep::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kPackThreads = 128;

unsigned blocks_for(int64_t items, int threads) {
  return static_cast<unsigned>((items + threads - 1) / threads);
}

template <typename Id>
__global__ void route_choices_kernel(const Id* __restrict__ ids, int64_t num_tokens, int32_t top_k,
                                     core::ExpertMap map, core::TokenChoices out,
                                     DispatchWorkspace ws, bool with_checksum) {
  extern __shared__ unsigned long long entries[];  // per rank, this block's
  for (int r = threadIdx.x; r < map.world; r += blockDim.x) entries[r] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < num_tokens) {
    const int64_t base = i * top_k;
    const int64_t errors =
        core::route_token_choices(ids + base, top_k, map, out.dest_key + base, out.owner + base,
                                  out.slot + base, out.local + base);
    if (errors != 0) atomicOr(ws.errors, static_cast<unsigned long long>(errors));
    for (int32_t j = 0; j < top_k; ++j) {
      atomicAdd(&entries[out.dest_key[base + out.owner[base + j]]], 1ull);
    }
  }
  if (with_checksum && i < map.num_slots) {
    atomicAdd(ws.checksum, core::map_checksum_term(i, map.slot_rank[i], map.slot_local[i]));
  }
  __syncthreads();
  for (int r = threadIdx.x; r < map.world; r += blockDim.x) {
    if (entries[r] != 0) atomicAdd(ws.entries + r, entries[r]);
  }
}

__global__ void write_header_kernel(int64_t* __restrict__ header, int32_t world, int32_t chunks,
                                    const int64_t* __restrict__ rank_offsets,
                                    const unsigned long long* __restrict__ entries,
                                    const unsigned long long* __restrict__ errors,
                                    const unsigned long long* __restrict__ checksum,
                                    int64_t config) {
  const int32_t peer = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (peer >= world) return;
  core::write_header_row(header + static_cast<int64_t>(peer) * core::kHeaderSize, peer, world,
                         chunks, rank_offsets, reinterpret_cast<const int64_t*>(entries), config,
                         static_cast<int64_t>(*checksum & core::kChecksumMask),
                         static_cast<int64_t>(*errors));
}

__global__ void write_status_kernel(int32_t* __restrict__ meta, int32_t meta_stride,
                                    int32_t status_column, int32_t world, int64_t capacity,
                                    const int64_t* __restrict__ rank_offsets,
                                    const unsigned long long* __restrict__ errors,
                                    const unsigned long long* __restrict__ checksum,
                                    int32_t config) {
  const int32_t rank = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (rank >= world) return;
  int32_t* status = meta + rank * capacity * meta_stride + status_column;
  status[core::kStatusOverflow] =
      static_cast<int32_t>(core::overflow_pairs(rank_offsets, world, capacity));
  status[core::kStatusConfig] = config;
  status[core::kStatusErrors] = static_cast<int32_t>(*errors);
  status[core::kStatusMap] = static_cast<int32_t>(*checksum & core::kChecksumMask);
}

// One block per token: thread 0 writes the token's metadata rows, then the block copies the
// token's hidden row to every row it owns.
template <int N>
__global__ void pack_kernel(core::PackArgs a) {
  using P = Pack<uint8_t, N>;
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) core::pack_token_metadata(a, t);
  __syncthreads();
  const int64_t packs = a.row_bytes / N;
  const P* src = reinterpret_cast<const P*>(a.x) + t * packs;
  for (int32_t j = 0; j < a.top_k; ++j) {
    const int64_t pair = t * a.top_k + j;
    if (a.dest_key[pair] < 0) continue;
    const int32_t row = a.token_slot[pair];
    if (row < 0) continue;
    P* dst = reinterpret_cast<P*>(a.x_send) + static_cast<int64_t>(row) * packs;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) dst[p] = src[p];
  }
}

}  // namespace

template <typename Id>
cudaError_t launch_route_choices(const Id* ids, int64_t num_tokens, int32_t top_k,
                                 const core::ExpertMap& map, const core::TokenChoices& out,
                                 const DispatchWorkspace& ws, bool with_checksum,
                                 cudaStream_t stream) {
  const int64_t threads_needed =
      with_checksum ? std::max<int64_t>(num_tokens, map.num_slots) : num_tokens;
  if (threads_needed == 0) return cudaSuccess;
  route_choices_kernel<Id>
      <<<blocks_for(threads_needed, kThreads), kThreads, map.world * sizeof(unsigned long long),
         stream>>>(ids, num_tokens, top_k, map, out, ws, with_checksum);
  return cudaGetLastError();
}

template cudaError_t launch_route_choices<int32_t>(const int32_t*, int64_t, int32_t,
                                                   const core::ExpertMap&,
                                                   const core::TokenChoices&,
                                                   const DispatchWorkspace&, bool, cudaStream_t);
template cudaError_t launch_route_choices<int64_t>(const int64_t*, int64_t, int32_t,
                                                   const core::ExpertMap&,
                                                   const core::TokenChoices&,
                                                   const DispatchWorkspace&, bool, cudaStream_t);

cudaError_t launch_write_header(int64_t* header, int32_t world, int32_t chunks,
                                const int64_t* rank_offsets, const unsigned long long* entries,
                                const unsigned long long* errors,
                                const unsigned long long* checksum, int64_t config,
                                cudaStream_t stream) {
  write_header_kernel<<<blocks_for(world, kThreads), kThreads, 0, stream>>>(
      header, world, chunks, rank_offsets, entries, errors, checksum, config);
  return cudaGetLastError();
}

cudaError_t launch_write_status(int32_t* meta, int32_t meta_stride, int32_t status_column,
                                int32_t world, int64_t capacity, const int64_t* rank_offsets,
                                const unsigned long long* errors,
                                const unsigned long long* checksum, int32_t config,
                                cudaStream_t stream) {
  write_status_kernel<<<blocks_for(world, kThreads), kThreads, 0, stream>>>(
      meta, meta_stride, status_column, world, capacity, rank_offsets, errors, checksum, config);
  return cudaGetLastError();
}

cudaError_t launch_pack(const core::PackArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;
  const int n = pack_width<uint8_t>(args.row_bytes, args.x, args.x_send);
  return dispatch_pack(n, [&](auto pack) {
    constexpr int N = decltype(pack)::value;
    pack_kernel<N><<<static_cast<unsigned>(args.num_tokens), kPackThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace moe_ep::kernels
