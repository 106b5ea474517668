// Argument checks for the torch glue (CPU kernels and CUDA glue). Messages match
// vtkernels/_validate.py; TORCH_CHECK_VALUE raises ValueError in Python.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <tuple>

namespace vtk {

// Grain (in tasks) for at::parallel_for when each task costs `work` elementary steps: small
// problems stay on one thread, where waking a thread pool costs more than it gives (and stalls
// badly when the cores are busy with other processes).
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name,
                    " must be a floating-point tensor, got ", t.scalar_type());
}

// Checks q/k of the scoring ops; returns N (patch tokens).
inline int64_t check_qk(const at::Tensor& q, const at::Tensor& k, int64_t num_heads,
                        c10::optional<double> scale, bool has_cls) {
  check_float(q, "q");
  check_float(k, "k");
  TORCH_CHECK_VALUE(q.device() == k.device(), "tensors must be on one device: q on ", q.device(),
                    ", k on ", k.device());
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be [B, T, C], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3, "k must be [B, T, C], got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.sizes() == k.sizes(), "q and k must have the same shape, got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype, got q ",
                    q.scalar_type(), " and k ", k.scalar_type());
  const int64_t C = q.size(2);
  TORCH_CHECK_VALUE(num_heads >= 1 && C % num_heads == 0, "num_heads=", num_heads,
                    " must be >= 1 and divide the channel count C=", C);
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), "scale must be finite, got ", *scale);
  const int64_t N = has_cls ? q.size(1) - 1 : q.size(1);
  TORCH_CHECK_VALUE(N >= 1, "q/k need at least one patch token, got T=", q.size(1),
                    " (has_cls=", has_cls, ")");
  return N;
}

inline void check_scores(const at::Tensor& scores) {
  check_float(scores, "scores");
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be [B, N], got shape ", scores.sizes());
  TORCH_CHECK_VALUE(scores.size(1) >= 1, "scores must have at least one token, got N=", scores.size(1));
}

inline void check_count(const char* name, int64_t value, int64_t N) {
  TORCH_CHECK_VALUE(value >= 1 && value <= N, name, "=", value, " must be in [1, N] with N=", N);
}

inline void check_tokens(const at::Tensor& x, int64_t B, int64_t N) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [B, N, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) == B, "x has batch ", x.size(0), ", expected ", B);
  TORCH_CHECK_VALUE(x.size(1) == N, "x has ", x.size(1), " tokens, expected N=", N);
}

inline void check_gather(const at::Tensor& x, const at::Tensor& indices) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                    "indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(x.device() == indices.device(), "tensors must be on one device: x on ", x.device(),
                    ", indices on ", indices.device());
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [B, N, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be [B, k], got shape ", indices.sizes());
  TORCH_CHECK_VALUE(indices.size(0) == x.size(0), "indices has batch ", indices.size(0),
                    ", x has batch ", x.size(0));
}

// Data-dependent: on CUDA it waits for the device, so both extremes come back in one copy (one
// wait, not one per item()). The CUDA glue skips it while a stream is being captured.
inline void check_gather_range(const at::Tensor& indices, int64_t N) {
  if (indices.numel() == 0) return;
  const auto extremes = at::aminmax(indices);
  const at::Tensor both = at::stack({std::get<0>(extremes), std::get<1>(extremes)}).to(at::kLong).cpu();
  const int64_t lo = both.const_data_ptr<int64_t>()[0], hi = both.const_data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(lo >= 0 && hi < N, "indices must lie in [0, N) with N=", N, ", got values in [",
                    lo, ", ", hi, "]");
}

inline int64_t grid_width_of(int64_t N, int64_t grid_width) {
  TORCH_CHECK_VALUE(grid_width >= 0, "grid_width must be >= 0, got ", grid_width);
  if (grid_width == 0) {
    int64_t w = static_cast<int64_t>(std::sqrt(static_cast<double>(N)));
    while (w * w > N) --w;
    while ((w + 1) * (w + 1) <= N) ++w;
    TORCH_CHECK_VALUE(w * w == N, "grid_width=0 means a square grid, but N=", N,
                      " is not a square; pass grid_width");
    return w;
  }
  TORCH_CHECK_VALUE(N % grid_width == 0, "grid_width=", grid_width, " must divide N=", N);
  return grid_width;
}

// Tokens x [B, N, D] with their scores [B, N], and a count `keep` in [1, N].
inline void check_tokens_scores_keep(const at::Tensor& x, const at::Tensor& scores, int64_t keep) {
  check_scores(scores);
  const int64_t B = scores.size(0), N = scores.size(1);
  check_tokens(x, B, N);
  TORCH_CHECK_VALUE(x.device() == scores.device(), "tensors must be on one device: x on ", x.device(),
                    ", scores on ", scores.device());
  check_count("keep", keep, N);
}

inline void check_fopru_select(const at::Tensor& x, const at::Tensor& scores, int64_t keep,
                               const std::string& strategy, int64_t grid_width) {
  check_tokens_scores_keep(x, scores, keep);
  const int64_t N = scores.size(1);
  TORCH_CHECK_VALUE(strategy == "rank" || strategy == "row",
                    "strategy must be 'rank' or 'row', got '", strategy, "'");
  if (strategy == "row") {
    grid_width_of(N, grid_width);
  } else {
    TORCH_CHECK_VALUE(grid_width >= 0, "grid_width must be >= 0, got ", grid_width);
  }
}

}  // namespace vtk
