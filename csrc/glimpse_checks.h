// Argument checks of the GlimpsePrune ops (glimpse_logits, gather_cache) for the CPU kernels and
// the CUDA glue. Messages match vtkernels/_validate.py (check_glimpse, check_gather_cache,
// check_gather_cache_range); TORCH_CHECK_VALUE raises ValueError in Python.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

#include "checks.h"

namespace vtk {

struct GlimpseShape {
  int64_t B, Hq, Hkv, L, D;
};

inline GlimpseShape check_glimpse(const at::Tensor& q, const at::Tensor& k, c10::optional<double> scale,
                                  const c10::optional<at::Tensor>& key_mask) {
  check_float(q, "q");
  check_float(k, "k");
  TORCH_CHECK_VALUE(q.device() == k.device(), "tensors must be on one device: q on ", q.device(),
                    ", k on ", k.device());
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be [B, Hq, D] (one query row per head), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be [B, Hkv, L, D] (a KV cache's keys), got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype, got q ",
                    q.scalar_type(), " and k ", k.scalar_type());
  const GlimpseShape s{q.size(0), q.size(1), k.size(1), k.size(2), q.size(2)};
  TORCH_CHECK_VALUE(k.size(0) == s.B, "k has batch ", k.size(0), ", q has batch ", s.B);
  TORCH_CHECK_VALUE(k.size(3) == s.D, "k has head_dim ", k.size(3), ", q has head_dim ", s.D);
  TORCH_CHECK_VALUE(s.Hkv >= 1 && s.Hq % s.Hkv == 0, "q's ", s.Hq, " heads must be a multiple of k's ", s.Hkv,
                    " heads (GQA)");
  TORCH_CHECK_VALUE(s.D >= 1, "head_dim must be >= 1, got ", s.D);
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), "scale must be finite, got ", *scale);
  if (key_mask.has_value()) {
    const at::Tensor& m = *key_mask;
    TORCH_CHECK_VALUE(m.device() == q.device(), "tensors must be on one device: q on ", q.device(),
                      ", key_mask on ", m.device());
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool, "key_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == s.B && m.size(1) == s.L, "key_mask must be [B, L] = [", s.B,
                      ", ", s.L, "], got shape ", m.sizes());
  }
  return s;
}

struct GatherCacheShape {
  int64_t B, L, M;
};

inline GatherCacheShape check_gather_cache(const at::TensorList& tensors, const at::Tensor& index) {
  TORCH_CHECK_VALUE(!tensors.empty(), "tensors must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2, "index must be [B, M], got shape ", index.sizes());
  const int64_t B = index.size(0), M = index.size(1);
  int64_t L = -1;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "tensors[", i,
                      "] must be a floating-point tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == index.device(), "tensors must be on one device: tensors[", i, "] on ",
                      t.device(), ", index on ", index.device());
    TORCH_CHECK_VALUE(t.dim() >= 3, "tensors[", i, "] must be [B, ..., L, D], got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.size(0) == B, "tensors[", i, "] has batch ", t.size(0), ", index has batch ", B);
    if (i == 0) {
      L = t.size(-2);
    } else {
      TORCH_CHECK_VALUE(t.size(-2) == L, "tensors[", i, "] has sequence length ", t.size(-2),
                        ", tensors[0] has ", L);
    }
  }
  return {B, L, M};
}

// The data-dependent part: index values in [-1, L). Given the extremes (the CUDA glue computes
// them with one aminmax and one host wait; the CPU kernel in its own pass).
inline void check_gather_cache_range(int64_t lo, int64_t hi, int64_t L) {
  TORCH_CHECK_VALUE(lo >= -1 && hi < L, "index must lie in [-1, L) with L=", L,
                    " (-1 = padding), got values in [", lo, ", ", hi, "]");
}

}  // namespace vtk
