// CUDA glue of the selection ops (compiled only in CUDA builds): checks, output allocation,
// dtype dispatch, and the launch of the torch-free kernels of select_kernels.cu on the current
// stream. Checks and messages are the CPU kernels' (checks.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "../checks.h"
#include "select_kernels.cuh"

namespace vtk {
namespace {

template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

// at::Half and at::BFloat16 have the layout of CUDA's __half and __nv_bfloat16.
template <typename scalar_t>
const typename CudaScalar<scalar_t>::type* cuda_data(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaScalar<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// The kernels count within a row in 32 bits.
void check_row_length(int64_t N) {
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "N=", N,
                    " is more tokens than the CUDA kernels support (2^31 - 1)");
}

// Sizes the gather's grid; torch caches the properties of each device.
int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// A gather moves bits, so the copy type depends on the element size only.
template <typename F>
void dispatch_element_size(const at::Tensor& x, const F& f) {
  switch (x.element_size()) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, "x has an unsupported dtype ", x.scalar_type());
  }
}

at::Tensor topk_indices_cuda(const at::Tensor& scores, int64_t k) {
  check_scores(scores);
  check_cuda(scores, "scores");
  const int64_t B = scores.size(0), N = scores.size(1);
  check_count("k", k, N);
  check_row_length(N);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::empty({B, k}, scores.options().dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_indices_cuda", [&] {
    gpu::launch_topk_indices(cuda_data<scalar_t>(scores), scores.stride(0), scores.stride(1), B, N, k,
                             out.data_ptr<int64_t>(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& indices) {
  check_gather(x, indices);
  check_cuda(x, "x");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), k = indices.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The range check copies the extremes to the host (one wait for the device), which a stream
  // being captured into a CUDA graph does not allow; the kernel never reads outside x anyway
  // (such rows come out as zeros). cudaStreamIsCapturing is what c10's
  // currentStreamCaptureStatusMayInitCtx calls, without depending on that header's guards.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusNone) check_gather_range(indices, N);
  const at::Tensor idx = indices.scalar_type() == at::kLong ? indices : indices.to(at::kLong);
  at::Tensor out = at::empty({B, k, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_element_size(x, [&](auto tag) {
    using E = decltype(tag);
    gpu::launch_gather_tokens(static_cast<const E*>(x.const_data_ptr()), x.stride(0), x.stride(1), x.stride(2),
                              B, N, D, idx.const_data_ptr<int64_t>(), idx.stride(0), idx.stride(1), k,
                              static_cast<E*>(out.data_ptr()), sm_count(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> fopru_select_cuda(const at::Tensor& x, const at::Tensor& scores,
                                                     int64_t keep, c10::string_view strategy,
                                                     int64_t grid_width) {
  const std::string strat(strategy);
  check_fopru_select(x, scores, keep, strat, grid_width);
  check_cuda(scores, "scores");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_row_length(N);
  const int64_t row_width = strat == "row" ? grid_width_of(N, grid_width) : 0;  // 0: rank strategy
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor idx = at::empty({B, keep}, scores.options().dtype(at::kLong));
  at::Tensor out = at::empty({B, keep, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "fopru_select_cuda", [&] {
    const auto* sp = cuda_data<scalar_t>(scores);
    dispatch_element_size(x, [&](auto tag) {
      using E = decltype(tag);
      gpu::launch_fopru_select(sp, scores.stride(0), scores.stride(1), static_cast<const E*>(x.const_data_ptr()),
                               x.stride(0), x.stride(1), x.stride(2), B, N, D, keep, row_width,
                               static_cast<E*>(out.data_ptr()), idx.data_ptr<int64_t>(), sm_count(), stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(vtk, CUDA, m) {
  m.impl("topk_indices", &topk_indices_cuda);
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("fopru_select", &fopru_select_cuda);
}

}  // namespace vtk
