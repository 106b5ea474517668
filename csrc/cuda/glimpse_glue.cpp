// CUDA glue of gather_cache (compiled only in CUDA builds): checks, output allocation, and the
// description of every tensor for the one-launch kernel of glimpse_kernels.cu, on the current
// stream. Checks and messages are the CPU kernel's (glimpse_checks.h). glimpse_logits on CUDA is
// served by Triton (vtkernels/triton/glimpse.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../glimpse_checks.h"
#include "glimpse_kernels.cuh"

namespace vtk {
namespace {

// The dims between batch and sequence as one dim: (rows H, element stride). False when their
// strides do not allow it (e.g. permuted middle dims).
bool collapse_middle(const at::Tensor& t, int64_t& H, int64_t& sh) {
  H = 1;
  sh = 0;
  int64_t prev_stride = 0;
  bool first = true;
  for (int64_t d = 1; d < t.dim() - 2; ++d) {
    const int64_t n = t.size(d), s = t.stride(d);
    if (n == 1) continue;  // any stride: never stepped over
    if (!first && prev_stride != s * n) return false;
    H *= n;
    sh = s;
    prev_stride = s;
    first = false;
  }
  return true;
}

// The widest copy unit (16, 8, 4, 2, 1 bytes) that tiles a row contiguous in D and keeps every
// row start aligned: row length, source and destination addresses and the byte strides of every
// dim that is stepped over.
int unit_bytes_for(int64_t row_bytes, uintptr_t src, uintptr_t dst, int64_t sb, int64_t sh, int64_t sl) {
  for (int w : {16, 8, 4, 2}) {
    if (row_bytes % w == 0 && src % w == 0 && dst % w == 0 && sb % w == 0 && sh % w == 0 && sl % w == 0)
      return w;
  }
  return 1;
}

template <int N>
void launch_chunk(const std::vector<gpu::GatherCacheTensor>& all, size_t begin, size_t end,
                  const at::Tensor& index, int64_t L, int64_t M, cudaStream_t stream) {
  gpu::GatherCacheArgs<N> args{};
  args.index = index.const_data_ptr<int64_t>();
  args.sib = index.stride(0);
  args.sim = index.stride(1);
  args.L = L;
  args.M = static_cast<int32_t>(M);
  args.count = static_cast<int32_t>(end - begin);
  std::copy(all.begin() + begin, all.begin() + end, args.t);
  gpu::launch_gather_cache<N>(args, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> gather_cache_cuda(at::TensorList tensors, const at::Tensor& index) {
  const GatherCacheShape s = check_gather_cache(tensors, index);
  TORCH_CHECK_VALUE(index.is_cuda(), "index must be a CUDA tensor, got one on ", index.device());
  const c10::cuda::CUDAGuard guard(index.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The range check copies the extremes to the host (one aminmax, one wait), which a stream
  // being captured into a CUDA graph does not allow; the kernel never reads outside a tensor
  // anyway (such rows come out as zeros).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusNone && index.numel() > 0) {
    const auto mm = at::aminmax(index);
    const at::Tensor ext = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
    check_gather_cache_range(ext[0].item<int64_t>(), ext[1].item<int64_t>(), s.L);
  }
  TORCH_CHECK_VALUE(s.M <= std::numeric_limits<int32_t>::max(), "index has M=", s.M,
                    " slots, more than the CUDA kernel supports (2^31 - 1)");

  std::vector<at::Tensor> outs, sources;
  std::vector<gpu::GatherCacheTensor> table;
  outs.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[shape.size() - 2] = s.M;
    outs.push_back(at::empty(shape, t.options().memory_format(at::MemoryFormat::Contiguous)));
    const at::Tensor& out = outs.back();
    if (out.numel() == 0) continue;
    int64_t H, sh;
    if (!collapse_middle(t, H, sh)) {
      t = t.contiguous();  // rare layouts only; kept alive in `sources` until the launch
      collapse_middle(t, H, sh);
    }
    sources.push_back(t);
    const int64_t es = t.element_size(), D = t.size(-1), nd = t.dim();
    // The stride of a dim of size 1 is arbitrary (whatever a view left there): never stepped
    // over, it must not spoil the alignment test.
    const int64_t sb = t.size(0) > 1 ? t.stride(0) * es : 0;
    const int64_t sl = s.L > 1 ? t.stride(nd - 2) * es : 0;
    sh = H > 1 ? sh * es : 0;
    gpu::GatherCacheTensor e{};
    e.src = static_cast<const char*>(t.const_data_ptr());
    e.dst = static_cast<char*>(out.data_ptr());
    e.sb = sb;
    e.sh = sh;
    e.sl = sl;
    e.heads = static_cast<int32_t>(H);
    if (D > 1 && t.stride(nd - 1) != 1) {  // strided rows: element by element
      e.unit_bytes = static_cast<int32_t>(es);
      e.su = t.stride(nd - 1) * es;
      e.units = static_cast<int32_t>(D);
    } else {
      const int64_t row = D * es;
      e.unit_bytes = unit_bytes_for(row, reinterpret_cast<uintptr_t>(e.src), reinterpret_cast<uintptr_t>(e.dst),
                                    sb, sh, sl);
      e.su = e.unit_bytes;
      e.units = static_cast<int32_t>(row / e.unit_bytes);
    }
    const int64_t total = s.B * H * s.M * static_cast<int64_t>(e.units);
    TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "tensors[", i, "] has ", total,
                      " copy units to write, more than the CUDA kernel supports (2^31 - 1)");
    e.total = static_cast<int32_t>(total);
    table.push_back(e);
  }
  // One launch: a small table (the usual 7B/13B cache: 44 to 54 tensors) fits the 4 KiB of
  // kernel parameters every driver accepts; a larger one takes CUDA 12.1's large parameters, and
  // only a list longer than kGatherCacheLarge needs more than one launch.
  if (table.size() <= static_cast<size_t>(gpu::kGatherCacheSmall)) {
    if (!table.empty()) launch_chunk<gpu::kGatherCacheSmall>(table, 0, table.size(), index, s.L, s.M, stream);
  } else {
    for (size_t b = 0; b < table.size(); b += gpu::kGatherCacheLarge)
      launch_chunk<gpu::kGatherCacheLarge>(table, b, std::min(table.size(), b + gpu::kGatherCacheLarge), index,
                                           s.L, s.M, stream);
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(vtk, CUDA, m) {
  m.impl("gather_cache", &gather_cache_cuda);
}

}  // namespace vtk
