// CUDA kernels of the selection ops (topk_indices, gather_tokens, fopru_select), torch-free:
// raw pointers, element strides, a stream. The torch glue is select_glue.cpp; the semantics are
// those of csrc/cpu/select_cpu.cpp, bit for bit (ALGORITHMS.md's tie rule, rank_key order).
//
// Launchers only enqueue work: the caller checks arguments and reads cudaGetLastError after.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vtk {
namespace gpu {

// Positions of the k best scores of each row of scores [B, N] (strides sb, sn), ascending, into
// out [B, k] (contiguous). S: float, __half, __nv_bfloat16 or double.
template <typename S>
void launch_topk_indices(const S* scores, int64_t sb, int64_t sn, int64_t B, int64_t N, int64_t k,
                         int64_t* out, cudaStream_t stream);

// out[b, j, :] = x[b, idx[b, j], :] for x [B, N, D] (strides sxb, sxn, sxd) and idx [B, k]
// (strides sib, sik); out is contiguous [B, k, D]. Rows with an index outside [0, N) come out as
// zeros, never read. E is the storage type of one element (uint16_t, uint32_t or uint64_t): a
// gather moves bits, so only the element size matters. x and out must not overlap. sm_count:
// the device's multiprocessor count, which sizes the grid (B = 1 still fills the GPU).
template <typename E>
void launch_gather_tokens(const E* x, int64_t sxb, int64_t sxn, int64_t sxd, int64_t B, int64_t N,
                          int64_t D, const int64_t* idx, int64_t sib, int64_t sik, int64_t k, E* out,
                          int sm_count, cudaStream_t stream);

// FoPru selection of `keep` tokens per image (a block per image), then the gather of the kept
// rows of x (launch_gather_tokens' kernel, on the same stream). row_width == 0: rank strategy
// (the keep best tokens); row_width = W > 0: row strategy on the (N / W) x W grid. Writes out_idx
// [B, keep] (ascending) and out_x [B, keep, D], both contiguous.
template <typename S, typename E>
void launch_fopru_select(const S* scores, int64_t sb, int64_t sn, const E* x, int64_t sxb,
                         int64_t sxn, int64_t sxd, int64_t B, int64_t N, int64_t D, int64_t keep,
                         int64_t row_width, E* out_x, int64_t* out_idx, int sm_count, cudaStream_t stream);

}  // namespace gpu
}  // namespace vtk
