// CPU kernels of the scoring ops: cls_attention, attention_received, fopru_significance.
//
// None of them materialises the [B, H, T, T] attention map. cls_attention computes one query
// row per head (a batched matrix-vector product). The column/row means work on blocks of query rows: logits of a block
// (one GEMM, cache-resident), softmax per row (each row sees all T keys), then the block's
// contribution is added to per-(image, head) column and row sums. Heads are reduced in a fixed
// order afterwards, so results do not depend on the thread count.
// float64 inputs accumulate in float64; everything else in float32. Output is float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"

namespace vtk {
namespace {

constexpr int64_t kRowBlock = 128;

double resolve_scale(c10::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

at::Tensor cls_attention_cpu(const at::Tensor& q, const at::Tensor& k, int64_t num_heads,
                             c10::optional<double> scale) {
  const int64_t N = check_qk(q, k, num_heads, scale, /*has_cls=*/true);
  const int64_t B = q.size(0), T = q.size(1), C = q.size(2), dh = C / num_heads;
  const double sc = resolve_scale(scale, dh);
  const auto acc = acc_type_of(q.scalar_type());
  auto out = at::empty({B, N}, q.options().dtype(at::kFloat));
  vtk::parallel_for(0, B, grain_for(T * C), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // One query row per head: logits [H, T] = k_h [H, T, dh] x q0_h [H, dh, 1] (a batched
      // matrix-vector product, vectorised by BLAS), softmax over all T keys, then heads added
      // in order and divided by H.
      at::Tensor q0 = q[b][0].to(acc).mul(sc).reshape({num_heads, dh, 1});
      at::Tensor kh = k[b].to(acc).reshape({T, num_heads, dh}).transpose(0, 1);
      at::Tensor p = at::_softmax(at::bmm(kh, q0).squeeze(2), 1, false);  // [H, T]
      at::Tensor total = p.select(0, 0).narrow(0, 1, N).clone();
      for (int64_t h = 1; h < num_heads; ++h) total.add_(p.select(0, h).narrow(0, 1, N));
      out[b].copy_(total.div_(static_cast<double>(num_heads)));
    }
  });
  return out;
}

// Column sums (over patch query rows) and row sums (over patch key columns) of the softmaxed
// attention, per image and head: colsum/rowsum are [B, H, N] in the accumulation dtype.
void patch_sums(const at::Tensor& q, const at::Tensor& k, int64_t num_heads, double sc, bool has_cls,
                at::Tensor& colsum, at::Tensor& rowsum) {
  const int64_t B = q.size(0), T = q.size(1), C = q.size(2), dh = C / num_heads;
  const int64_t off = has_cls ? 1 : 0, N = T - off;
  const auto acc = acc_type_of(q.scalar_type());
  colsum = at::zeros({B, num_heads, N}, q.options().dtype(acc));
  rowsum = at::zeros({B, num_heads, N}, q.options().dtype(acc));
  vtk::parallel_for(0, B * num_heads, grain_for(T * T * dh), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / num_heads, h = i % num_heads;
        // Head slices of one image: strided views, converted once to the accumulation dtype.
        at::Tensor qh = q[b].narrow(1, h * dh, dh).to(acc).mul(sc);  // mul, not mul_: .to may alias q
        at::Tensor kt = k[b].narrow(1, h * dh, dh).to(acc).t();
        at::Tensor col_t = colsum[b][h], row_t = rowsum[b][h];
        for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
          const int64_t nr = std::min(kRowBlock, T - r0);
          // Logits of a block of query rows against all T keys, then softmax per row: each row
          // sees every key, so the block's probabilities are final. ATen's vectorised softmax
          // and reductions; the block (nr x T) stays in cache.
          at::Tensor p = at::_softmax(at::mm(qh.narrow(0, r0, nr), kt), 1, false);
          const int64_t first = std::max(r0, off);  // the CLS query row is not a patch row
          if (first >= r0 + nr) continue;
          at::Tensor patch = p.narrow(0, first - r0, r0 + nr - first).narrow(1, off, N);
          col_t.add_(patch.sum(0));
          row_t.narrow(0, first - off, r0 + nr - first).copy_(patch.sum(1));
        }
      }
  });
}

// Mean over heads and over the N patch rows/columns: [B, H, N] sums -> [B, N] means.
at::Tensor head_mean(const at::Tensor& sums, int64_t N) {
  // Heads are added in order (not a parallel reduction), so the result is thread-count free.
  at::Tensor total = sums.select(1, 0).clone();
  for (int64_t h = 1; h < sums.size(1); ++h) total.add_(sums.select(1, h));
  return total.div_(static_cast<double>(sums.size(1))).div_(static_cast<double>(N));
}

at::Tensor attention_received_cpu(const at::Tensor& q, const at::Tensor& k, int64_t num_heads,
                                  c10::optional<double> scale, bool has_cls) {
  const int64_t N = check_qk(q, k, num_heads, scale, has_cls);
  at::Tensor colsum, rowsum;
  patch_sums(q, k, num_heads, resolve_scale(scale, q.size(2) / num_heads), has_cls, colsum, rowsum);
  return head_mean(colsum, N).to(at::kFloat);
}

at::Tensor fopru_significance_cpu(const at::Tensor& q, const at::Tensor& k, int64_t num_heads,
                                  c10::optional<double> scale, bool has_cls) {
  const int64_t N = check_qk(q, k, num_heads, scale, has_cls);
  at::Tensor colsum, rowsum;
  patch_sums(q, k, num_heads, resolve_scale(scale, q.size(2) / num_heads), has_cls, colsum, rowsum);
  at::Tensor col = head_mean(colsum, N), row = head_mean(rowsum, N);
  // Population variance; the column means win ties (ALGORITHMS.md: col if Var(col) >= Var(row)).
  at::Tensor use_col = col.var(1, /*unbiased=*/false).ge(row.var(1, /*unbiased=*/false));
  return at::where(use_col.unsqueeze(1), col, row).to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(vtk, CPU, m) {
  m.impl("cls_attention", &cls_attention_cpu);
  m.impl("attention_received", &attention_received_cpu);
  m.impl("fopru_significance", &fopru_significance_cpu);
}

}  // namespace vtk
