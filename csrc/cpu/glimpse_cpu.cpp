// CPU kernels of the GlimpsePrune ops: glimpse_logits and gather_cache (ALGORITHMS.md,
// "GlimpsePrune", steps 2 and 5).
//
// glimpse_logits: one query row per head against a KV cache's keys, never a [Hq, L, L] map.
// Tasks are (image, kv head, block of keys): the block's keys are widened once into a small
// buffer (whatever their strides: a cache is often a slice of a preallocated buffer) and every
// query head of that kv head (GQA: h // (Hq / Hkv)) is dotted with them while they are in cache,
// so k is read exactly once. Dot products use eight partial sums in a fixed order, so results do
// not depend on the thread count. The log-softmax is a second pass per row (max, sum of exp,
// subtract) in the accumulation dtype, with the reference's formula.
// Accumulation is float32, float64 for float64 inputs; the output is float32.
//
// gather_cache: one parallel loop over every output row of every tensor, (tensor, b, middle...,
// m), each a memcpy of D elements (a zero fill for index -1), or an element-by-element copy when
// the tensor's rows are not contiguous in D. A gather moves bits: outputs are exact for any dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../glimpse_checks.h"
#include "cpu_common.h"

namespace vtk {
namespace {

// ---- glimpse_logits -------------------------------------------------------------------------

constexpr int64_t kKeyBlock = 64;

// Eight independent partial sums: the compiler vectorises them without reassociating anything,
// and the fixed combination order keeps the result reproducible.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[d + j] * b[d + j];
  acc_t tail = 0;
  for (; d < n; ++d) tail += a[d] * b[d];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// lg [B, Hq, L] (contiguous, acc_t) = (q . k) * scale for every query head and key.
template <typename scalar_t>
void glimpse_dots(const at::Tensor& q, const at::Tensor& k, const GlimpseShape& s, double scale,
                  compute_t<scalar_t>* lg) {
  using acc_t = compute_t<scalar_t>;
  const int64_t G = s.Hq / s.Hkv, nblocks = (s.L + kKeyBlock - 1) / kKeyBlock;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsd = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksl = k.stride(2), ksd = k.stride(3);
  // The reference multiplies acc_t logits by the Python float: torch rounds it to acc_t first.
  const acc_t sc = static_cast<acc_t>(scale);
  const int64_t tasks = s.B * s.Hkv * nblocks;
  vtk::parallel_for(0, tasks, grain_for(G * kKeyBlock * s.D), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> qbuf(G * s.D), kbuf(kKeyBlock * s.D);
    int64_t loaded = -1;  // (b, kv head) whose query rows are in qbuf
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nblocks, blk = t % nblocks;
      const int64_t b = bh / s.Hkv, kvh = bh % s.Hkv;
      if (bh != loaded) {
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* row = qp + b * qsb + (kvh * G + g) * qsh;
          for (int64_t d = 0; d < s.D; ++d) qbuf[g * s.D + d] = static_cast<acc_t>(row[d * qsd]);
        }
        loaded = bh;
      }
      const int64_t l0 = blk * kKeyBlock, nl = std::min(kKeyBlock, s.L - l0);
      for (int64_t j = 0; j < nl; ++j) {
        const scalar_t* row = kp + b * ksb + kvh * ksh + (l0 + j) * ksl;
        acc_t* dst = kbuf.data() + j * s.D;
        for (int64_t d = 0; d < s.D; ++d) dst[d] = static_cast<acc_t>(row[d * ksd]);
      }
      for (int64_t g = 0; g < G; ++g) {
        acc_t* out = lg + ((b * s.Hq + kvh * G + g) * s.L + l0);
        const acc_t* qr = qbuf.data() + g * s.D;
        for (int64_t j = 0; j < nl; ++j) out[j] = dot(qr, kbuf.data() + j * s.D, s.D) * sc;
      }
    }
  });
}

// In place over each row of lg [B, Hq, L]: log-softmax over the keys where mask is true (all
// keys without a mask), -inf elsewhere; a row with no key left is all -inf. The reference's
// formula: m = max, lse = log(sum exp(x - m)) + m (m = 0 when no key is left), x - lse.
template <typename acc_t>
void glimpse_log_softmax(acc_t* lg, const GlimpseShape& s, const c10::optional<at::Tensor>& key_mask) {
  const bool* mp = key_mask.has_value() ? key_mask->const_data_ptr<bool>() : nullptr;
  const int64_t msb = mp ? key_mask->stride(0) : 0, msl = mp ? key_mask->stride(1) : 0;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  vtk::parallel_for(0, s.B * s.Hq, grain_for(4 * s.L), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* x = lg + r * s.L;
      const bool* mrow = mp ? mp + (r / s.Hq) * msb : nullptr;
      auto kept = [&](int64_t l) { return mrow == nullptr || mrow[l * msl]; };
      acc_t m = ninf;
      for (int64_t l = 0; l < s.L; ++l)
        if (kept(l)) m = std::max(m, x[l]);
      if (!std::isfinite(m)) m = 0;
      acc_t sum = 0;
      for (int64_t l = 0; l < s.L; ++l)
        if (kept(l)) sum += std::exp(x[l] - m);
      const acc_t lse = std::log(sum) + m;
      for (int64_t l = 0; l < s.L; ++l) x[l] = kept(l) ? x[l] - lse : ninf;
    }
  });
}

at::Tensor glimpse_logits_cpu(const at::Tensor& q_in, const at::Tensor& k_in, c10::optional<double> scale,
                              const c10::optional<at::Tensor>& key_mask, bool log_softmax) {
  const GlimpseShape s = check_glimpse(q_in, k_in, scale, key_mask);
  at::Tensor q = q_in, k = k_in;
  const auto st = q.scalar_type();
  if (st != at::kDouble && st != at::kFloat && st != at::kHalf && st != at::kBFloat16) {
    // Other float formats (float8) widen exactly to float32.
    q = q.to(at::kFloat);
    k = k.to(at::kFloat);
  }
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.D));
  at::Tensor out = at::empty({s.B, s.Hq, s.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  // float64 logits and log-softmax stay float64 until the final rounding, as in the reference.
  at::Tensor lg = q.scalar_type() == at::kDouble ? at::empty({s.B, s.Hq, s.L}, q.options()) : out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "glimpse_logits_cpu", [&] {
    using acc_t = compute_t<scalar_t>;
    acc_t* lp = lg.data_ptr<acc_t>();
    glimpse_dots<scalar_t>(q, k, s, sc, lp);
    if (log_softmax) glimpse_log_softmax<acc_t>(lp, s, key_mask);
  });
  if (!lg.is_same(out)) out.copy_(lg);
  return out;
}

// ---- gather_cache -----------------------------------------------------------------------------

// One input tensor [B, mid..., L, D] and its output [B, mid..., M, D] (contiguous), in bytes.
struct CopyPlan {
  const char* src;
  char* dst;
  std::vector<int64_t> mid_sizes, mid_strides;  // dims 1 .. dim-3
  int64_t mid_count;                            // product of mid_sizes
  int64_t sb, sl, sd, elem, D, row_bytes;
  bool rows_contiguous;
  int64_t first_row;  // global number of this tensor's first output row
};

template <typename E>
void strided_row(char* dst, const char* src, int64_t sd, int64_t D) {
  E* d = reinterpret_cast<E*>(dst);
  for (int64_t i = 0; i < D; ++i) std::memcpy(d + i, src + i * sd, sizeof(E));
}

void copy_row(const CopyPlan& p, char* dst, const char* src) {
  if (p.rows_contiguous) {
    std::memcpy(dst, src, p.row_bytes);
    return;
  }
  switch (p.elem) {
    case 1: strided_row<uint8_t>(dst, src, p.sd, p.D); break;
    case 2: strided_row<uint16_t>(dst, src, p.sd, p.D); break;
    case 4: strided_row<uint32_t>(dst, src, p.sd, p.D); break;
    default: strided_row<uint64_t>(dst, src, p.sd, p.D); break;
  }
}

std::vector<at::Tensor> gather_cache_cpu(at::TensorList tensors, const at::Tensor& index_in) {
  const GatherCacheShape s = check_gather_cache(tensors, index_in);
  const at::Tensor index = index_in.contiguous();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  if (index.numel() > 0) {
    const auto mm = std::minmax_element(ip, ip + index.numel());
    check_gather_cache_range(*mm.first, *mm.second, s.L);
  }

  std::vector<at::Tensor> outs;
  std::vector<CopyPlan> plans;
  outs.reserve(tensors.size());
  plans.reserve(tensors.size());
  int64_t rows = 0, bytes = 0;
  for (const at::Tensor& t : tensors) {
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[shape.size() - 2] = s.M;
    outs.push_back(at::empty(shape, t.options().memory_format(at::MemoryFormat::Contiguous)));
    CopyPlan p;
    const int64_t nd = t.dim(), es = t.element_size();
    p.src = static_cast<const char*>(t.const_data_ptr());
    p.dst = static_cast<char*>(outs.back().data_ptr());
    p.mid_count = 1;
    for (int64_t d = 1; d < nd - 2; ++d) {
      p.mid_sizes.push_back(t.size(d));
      p.mid_strides.push_back(t.stride(d) * es);
      p.mid_count *= t.size(d);
    }
    p.sb = t.stride(0) * es;
    p.sl = t.stride(nd - 2) * es;
    p.sd = t.stride(nd - 1) * es;
    p.elem = es;
    p.D = t.size(nd - 1);
    p.row_bytes = p.D * es;
    p.rows_contiguous = p.D <= 1 || p.sd == es;
    p.first_row = rows;
    plans.push_back(std::move(p));
    rows += s.B * plans.back().mid_count * s.M;
    bytes += s.B * plans.back().mid_count * s.M * plans.back().row_bytes;
  }
  if (rows == 0) return outs;

  const int64_t M = s.M;
  vtk::parallel_for(0, rows, grain_for(std::max<int64_t>(1, bytes / rows)), [&](int64_t r0, int64_t r1) {
    // The tensor that owns row r0, then walk: each (tensor, b, mid...) segment of M rows shares
    // one source base, computed once.
    size_t ti = std::upper_bound(plans.begin(), plans.end(), r0,
                                 [](int64_t r, const CopyPlan& p) { return r < p.first_row; }) -
                plans.begin() - 1;
    int64_t r = r0;
    while (r < r1) {
      while (ti + 1 < plans.size() && r >= plans[ti + 1].first_row) ++ti;
      const CopyPlan& p = plans[ti];
      const int64_t local = r - p.first_row, o = local / M;
      int64_t m = local % M;
      const int64_t b = o / p.mid_count;
      int64_t rest = o % p.mid_count;
      const char* base = p.src + b * p.sb;
      for (int64_t d = static_cast<int64_t>(p.mid_sizes.size()) - 1; d >= 0; --d) {
        base += (rest % p.mid_sizes[d]) * p.mid_strides[d];
        rest /= p.mid_sizes[d];
      }
      const int64_t* irow = ip + b * M;
      const int64_t end = std::min(r1, p.first_row + (o + 1) * M);
      char* dst = p.dst + (o * M + m) * p.row_bytes;
      for (; r < end; ++r, ++m, dst += p.row_bytes) {
        const int64_t i = irow[m];
        if (i < 0) {
          std::memset(dst, 0, p.row_bytes);  // a padding slot
        } else {
          copy_row(p, dst, base + i * p.sl);
        }
      }
    }
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(vtk, CPU, m) {
  m.impl("glimpse_logits", &glimpse_logits_cpu);
  m.impl("gather_cache", &gather_cache_cpu);
}

}  // namespace vtk
