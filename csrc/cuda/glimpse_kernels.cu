// CUDA kernel of gather_cache: every layer's keys and values gathered along the sequence in one
// launch (GlimpsePrune, ALGORITHMS.md step 5).
//
// Grid (unit tiles, tensors): blockIdx.y picks the tensor from the by-value argument table,
// blockIdx.x a tile of kThreads * kUnroll consecutive units of its output. Each thread issues its
// kUnroll loads before any store, so several 16-byte loads per thread are in flight (a gather is
// bound by memory latency, not arithmetic). A unit w of the output is row w / units of
// [B, H, M], unit w % units within the row; the row's source is index[b, m] of (b, h). Tiles past
// a tensor's end (tensors of different sizes share the grid) return at once.
#include "glimpse_kernels.cuh"

namespace vtk {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename U, int N>
__device__ __forceinline__ void copy_tile(const GatherCacheArgs<N>& a, const GatherCacheTensor& t,
                                          uint32_t first, uint32_t total) {
  const char* __restrict__ src = t.src;
  U* __restrict__ dst = reinterpret_cast<U*>(t.dst);
  const uint32_t units = static_cast<uint32_t>(t.units), heads = static_cast<uint32_t>(t.heads);
  const uint32_t M = static_cast<uint32_t>(a.M);
  U v[kUnroll];
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    const uint32_t w = first + j * kThreads + threadIdx.x;
    v[j] = U{};  // zeros: a padding slot, or a unit past the end (not stored)
    if (w < total) {
      const uint32_t row = w / units, u = w - row * units;
      const uint32_t o = row / M, m = row - o * M;
      const uint32_t b = o / heads, h = o - b * heads;
      const int64_t i = a.index[b * a.sib + m * a.sim];
      // Out-of-range indices (only possible inside a CUDA graph, where the glue skips the range
      // check) come out as zeros and are never read.
      if (i >= 0 && i < a.L)
        v[j] = *reinterpret_cast<const U*>(src + b * t.sb + h * t.sh + i * t.sl + u * t.su);
    }
  }
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    const uint32_t w = first + j * kThreads + threadIdx.x;
    if (w < total) dst[w] = v[j];
  }
}

template <int N>
__global__ void __launch_bounds__(kThreads) gather_cache_kernel(const __grid_constant__ GatherCacheArgs<N> a) {
  const GatherCacheTensor& t = a.t[blockIdx.y];
  const uint32_t total = static_cast<uint32_t>(t.total);
  const uint32_t first = blockIdx.x * (kThreads * kUnroll);
  if (first >= total) return;
  // One tensor per block: the switch is uniform, no divergence.
  switch (t.unit_bytes) {
    case 16: copy_tile<uint4>(a, t, first, total); break;
    case 8: copy_tile<uint2>(a, t, first, total); break;
    case 4: copy_tile<uint32_t>(a, t, first, total); break;
    case 2: copy_tile<uint16_t>(a, t, first, total); break;
    default: copy_tile<uint8_t>(a, t, first, total); break;
  }
}

}  // namespace

template <int N>
void launch_gather_cache(const GatherCacheArgs<N>& args, cudaStream_t stream) {
  int64_t most = 0;
  for (int i = 0; i < args.count; ++i) most = args.t[i].total > most ? args.t[i].total : most;
  if (args.count == 0 || most == 0) return;
  const int64_t per_block = kThreads * kUnroll;
  const dim3 grid(static_cast<unsigned>((most + per_block - 1) / per_block), static_cast<unsigned>(args.count));
  gather_cache_kernel<N><<<grid, kThreads, 0, stream>>>(args);
}

template void launch_gather_cache<kGatherCacheSmall>(const GatherCacheArgs<kGatherCacheSmall>&, cudaStream_t);
template void launch_gather_cache<kGatherCacheLarge>(const GatherCacheArgs<kGatherCacheLarge>&, cudaStream_t);

}  // namespace gpu
}  // namespace vtk
