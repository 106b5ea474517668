// CUDA kernel of gather_cache, torch-free: raw addresses, byte strides, a stream. The torch glue
// is glimpse_glue.cpp; the semantics are those of csrc/cpu/glimpse_cpu.cpp, bit for bit (a
// gather moves bits).
//
// The launcher only enqueues work: the caller checks arguments and reads cudaGetLastError after.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vtk {
namespace gpu {

// One tensor [B, H, L, D] of the list (its middle dims collapsed into H by the glue) and its
// contiguous output [B, H, M, D]. A row (D elements) is copied as `units` units of `unit_bytes`
// bytes (16, 8, 4, 2 or 1), consecutive units `su` bytes apart in the source (su = unit_bytes
// for rows contiguous in D; the element stride when a row is strided, unit_bytes = element size).
struct GatherCacheTensor {
  const char* src;
  char* dst;
  int64_t sb, sh, sl, su;  // byte strides: batch, middle rows, sequence, units
  int32_t heads;           // H
  int32_t units;           // units per row
  int32_t unit_bytes;
  int32_t total;           // B * H * M * units: the output's size in units (< 2^31)
};

// Kernel arguments, passed by value (__grid_constant__): nothing to copy to the device first, so a
// launch is one plain kernel node inside a CUDA graph. Up to kGatherCacheSmall tensors the
// arguments stay under the 4 KiB every driver accepts; larger lists use the 32 KiB kernel
// parameters of CUDA 12.1+ on sm_70+ (up to kGatherCacheLarge tensors per launch).
constexpr int kGatherCacheSmall = 60;
constexpr int kGatherCacheLarge = 480;

template <int N>
struct GatherCacheArgs {
  const int64_t* index;  // [B, M] int64, strides sib, sim (elements)
  int64_t sib, sim;
  int64_t L;
  int32_t M;
  int32_t count;  // tensors in use, <= N
  GatherCacheTensor t[N];
};

// Output rows (b, h, m) of every tensor = source row index[b, m] of (b, h), or zeros where the
// index is outside [0, L). One launch. Tensors with total == 0 must not be in the table.
template <int N>
void launch_gather_cache(const GatherCacheArgs<N>& args, cudaStream_t stream);

}  // namespace gpu
}  // namespace vtk
