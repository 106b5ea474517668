// CPU kernels of the pruning ops: vispruner_select and prumerge (ALGORITHMS.md).
//
// Both compute their cosine similarities once, one matrix product per image (BLAS, all threads),
// then work per image (or per output row) on the cached product:
// - vispruner_select: the similarities of all tokens, [N, N] per image, once; the
//   duplicate-removal rounds then only read that matrix (the published code re-gathers and
//   re-multiplies the residual features every round).
// - prumerge: the similarities of every kept token to every token, [K, N] per image; each output
//   row is then its top-knn selection and weighted sum, in one pass over the row.
// The products are formed with exactly the ATen calls of reference.vispruner_similarity and
// reference.prumerge_similarity (same normalisation, same shapes and layouts): BLAS rounds
// differently across shapes (a subset, batched or matrix-vector product can differ in the last
// bit, e.g. -2.2e-17 against an exact 0), and float64 results must equal the reference's
// exactly, exact ties included.
// Ranking follows the universal tie rule through rank_key (higher first, equal -> lower position
// first, NaN lowest). Similarities and sums are float32, float64 for float64 inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"
#include "../common/rank_key.h"

namespace vtk {
namespace {

// Positions of one score row, best first (the full ranking order).
template <typename scalar_t>
void rank_row(const scalar_t* s, int64_t stride, int64_t N, int64_t* out,
              std::vector<std::pair<key_t<scalar_t>, int64_t>>& buf) {
  keyed_row(s, stride, N, buf);
  std::sort(buf.begin(), buf.end(), ranks_before<key_t<scalar_t>>);
  for (int64_t i = 0; i < N; ++i) out[i] = buf[i].second;
}

// [B, N] int64: each row's positions best first.
at::Tensor rank_order(const at::Tensor& scores) {
  const int64_t B = scores.size(0), N = scores.size(1);
  auto order = at::empty({B, N}, scores.options().dtype(at::kLong));
  int64_t* op = order.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "vtk_rank_order", [&] {
    const scalar_t* sp = scores.const_data_ptr<scalar_t>();
    const int64_t sb = scores.stride(0), sn = scores.stride(1);
    vtk::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<std::pair<key_t<scalar_t>, int64_t>> buf;
      for (int64_t b = b0; b < b1; ++b) rank_row(sp + b * sb, sn, N, op + b * N, buf);
    });
  });
  return order;
}

// reference.l2_normalize(x.to(acc_dtype)): the same ATen ops (Tensor.norm(dim=-1) is
// linalg_vector_norm with ord 2), hence the same values and the same layout.
at::Tensor l2_normalized(const at::Tensor& x) {
  at::Tensor xa = x.to(acc_type_of(x.scalar_type()));
  return xa / at::linalg_vector_norm(xa, 2, {-1}, /*keepdim=*/true, std::nullopt).clamp_min(1e-12);
}

// ---------------------------------------------------------------------------------------------
// vispruner_select

void check_vispruner(const at::Tensor& x, const at::Tensor& scores, int64_t keep, double important_ratio,
                     int64_t dedup_step) {
  check_tokens_scores_keep(x, scores, keep);
  TORCH_CHECK_VALUE(important_ratio >= 0.0 && important_ratio <= 1.0,
                    "important_ratio must be in [0, 1], got ", important_ratio);
  TORCH_CHECK_VALUE(dedup_step >= 1, "dedup_step must be >= 1, got ", dedup_step);
}

// The duplicate-removal rounds of one image. S: [N, N] similarities of all tokens (row-major);
// res: the R0 residual positions, best first. `list` holds token positions and ends with the
// n_div selected ones.
//
// Reading of ALGORITHMS.md (as the published code): the a-entries (even list positions) are
// scored by their highest similarity to any b-entry (odd positions); the r best-matched a-entries
// are dropped and the rest lead the new list in descending order of that match score, equal
// scores keeping the lower list position first (a stable version of the published argsort).
// NaN similarities never win a max (same as NaN -> -inf; a cosine is never -inf).
template <typename acc_t>
void dedup_rounds(const acc_t* S, int64_t N, const int64_t* res, int64_t R0, int64_t n_div, int64_t step,
                  std::vector<int32_t>& list,
                  std::vector<int32_t>& next, std::vector<int32_t>& bidx,
                  std::vector<std::pair<key_t<acc_t>, int64_t>>& ranked) {
  list.assign(res, res + R0);
  while (true) {
    const int64_t R = static_cast<int64_t>(list.size());
    const int64_t r = std::min(step, R - n_div);
    if (r <= 0) break;
    const int64_t na = (R + 1) / 2, nb = R / 2;
    bidx.resize(nb);
    for (int64_t j = 0; j < nb; ++j) bidx[j] = list[2 * j + 1];
    ranked.resize(na);
    for (int64_t i = 0; i < na; ++i) {
      const acc_t* row = S + static_cast<int64_t>(list[2 * i]) * N;
      // Four running maxima: independent chains hide the latency of the gathered loads.
      acc_t m0 = -std::numeric_limits<acc_t>::infinity(), m1 = m0, m2 = m0, m3 = m0;
      int64_t j = 0;
      for (; j + 4 <= nb; j += 4) {
        const acc_t v0 = row[bidx[j]], v1 = row[bidx[j + 1]], v2 = row[bidx[j + 2]], v3 = row[bidx[j + 3]];
        m0 = v0 > m0 ? v0 : m0;
        m1 = v1 > m1 ? v1 : m1;
        m2 = v2 > m2 ? v2 : m2;
        m3 = v3 > m3 ? v3 : m3;
      }
      for (; j < nb; ++j) m0 = row[bidx[j]] > m0 ? row[bidx[j]] : m0;
      m0 = m1 > m0 ? m1 : m0;
      m2 = m3 > m2 ? m3 : m2;
      ranked[i] = {rank_key(m2 > m0 ? m2 : m0), i};
    }
    std::sort(ranked.begin(), ranked.end(), ranks_before<key_t<acc_t>>);
    const int64_t drop = std::min(r, na);  // (fix) with an odd R, a has one entry more than b
    next.clear();
    for (int64_t t = drop; t < na; ++t) next.push_back(list[2 * ranked[t].second]);
    next.insert(next.end(), bidx.begin(), bidx.end());
    list.swap(next);
  }
}

at::Tensor vispruner_select_cpu(const at::Tensor& x, const at::Tensor& scores, int64_t keep,
                                double important_ratio, int64_t dedup_step) {
  check_vispruner(x, scores, keep, important_ratio, dedup_step);
  const int64_t B = x.size(0), N = x.size(1);
  // floor(T * ratio) in float64: the published int(T * r)
  const int64_t n_imp = static_cast<int64_t>(std::floor(static_cast<double>(keep) * important_ratio));
  const int64_t n_div = keep - n_imp, R0 = N - n_imp;
  at::Tensor order = rank_order(scores);
  auto out = at::empty({B, keep}, scores.options().dtype(at::kLong));
  const int64_t* ordp = order.const_data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();

  const bool rounds = n_div > 0 && R0 > n_div;
  // reference.vispruner_similarity: one product xn[b] @ xn[b].T per image, [N, N], all tokens.
  std::vector<at::Tensor> S;
  if (rounds) {
    at::Tensor xn = l2_normalized(x);
    for (int64_t b = 0; b < B; ++b) S.push_back(at::matmul(xn.select(0, b), xn.select(0, b).t()).contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES(acc_type_of(x.scalar_type()), "vispruner_select_cpu", [&] {
    vtk::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int32_t> list, next, bidx;
      std::vector<std::pair<key_t<scalar_t>, int64_t>> ranked;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* ord = ordp + b * N;
        int64_t* o = op + b * keep;
        std::copy(ord, ord + n_imp, o);
        if (n_div > 0) {
          if (rounds) {
            dedup_rounds(S[b].const_data_ptr<scalar_t>(), N, ord + n_imp, R0, n_div, dedup_step, list, next, bidx,
                         ranked);
            for (int64_t t = 0; t < n_div; ++t) o[n_imp + t] = list[t];
          } else {  // R0 == n_div: nothing to remove
            std::copy(ord + n_imp, ord + n_imp + n_div, o + n_imp);
          }
        }
        std::sort(o, o + keep);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// prumerge

void check_prumerge(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& scores, int64_t knn) {
  check_scores(scores);
  const int64_t B = scores.size(0), N = scores.size(1);
  check_tokens(x, B, N);
  check_float(keys, "keys");
  TORCH_CHECK_VALUE(keys.dim() == 3, "keys must be [B, N, D], got shape ", keys.sizes());
  TORCH_CHECK_VALUE(keys.size(0) == B, "keys has batch ", keys.size(0), ", expected ", B);
  TORCH_CHECK_VALUE(keys.size(1) == N, "keys has ", keys.size(1), " tokens, expected N=", N);
  TORCH_CHECK_VALUE(x.device() == scores.device() && keys.device() == scores.device(),
                    "tensors must be on one device: x on ", x.device(), ", keys on ", keys.device(),
                    ", scores on ", scores.device());
  TORCH_CHECK_VALUE(knn >= 1, "knn must be >= 1, got ", knn);
}

// Q3 + 1.5 (Q3 - Q1) of v (sorted in place), in T; NaN if v holds a NaN (as numpy).
// Quartiles as numpy.percentile 'linear': virtual index (n - 1) q (exact for q = 1/4, 3/4), then
// numpy's lerp: a + (b - a) t for t < 0.5, else b - (b - a)(1 - t).
// Every product is rounded on its own (no fused multiply-add), as in numpy and torch.
template <typename T>
T rounded(T v) {
  volatile T r = v;
  return r;
}

template <typename T>
T iqr_upper_bound(std::vector<T>& v) {
  for (T e : v)
    if (e != e) return std::numeric_limits<T>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const int64_t n = static_cast<int64_t>(v.size());
  auto percentile = [&](double q) {
    const double h = static_cast<double>(n - 1) * q;
    const int64_t lo = static_cast<int64_t>(h);
    const double t = h - static_cast<double>(lo);
    const T a = v[lo], b = v[std::min(lo + 1, n - 1)];
    const T d = b - a;
    return t < 0.5 ? static_cast<T>(a + rounded<T>(d * static_cast<T>(t)))
                   : static_cast<T>(b - rounded<T>(d * static_cast<T>(1.0 - t)));
  };
  const T q1 = percentile(0.25), q3 = percentile(0.75);
  return static_cast<T>(q3 + rounded<T>(static_cast<T>(1.5) * static_cast<T>(q3 - q1)));
}

// Adaptive counts (at least 1: the fix for "no outlier"). s: [B, N] contiguous, float or double.
template <typename T>
std::vector<int64_t> outlier_counts(const T* s, int64_t B, int64_t N, bool per_sample) {
  std::vector<int64_t> counts(B, 0);
  std::vector<T> buf;
  if (B == 0) return counts;  // nothing to pool (and no division by B)
  if (per_sample) {
    for (int64_t b = 0; b < B; ++b) {
      buf.assign(s + b * N, s + (b + 1) * N);
      const T bound = iqr_upper_bound(buf);
      for (int64_t j = 0; j < N; ++j) counts[b] += s[b * N + j] > bound;
    }
  } else {  // pooled over the batch: int(N * n_out / (B N)) of the published code, exactly
    buf.assign(s, s + B * N);
    const T bound = iqr_upper_bound(buf);
    int64_t total = 0;
    for (int64_t j = 0; j < B * N; ++j) total += s[j] > bound;
    std::fill(counts.begin(), counts.end(), total / B);
  }
  for (auto& c : counts) c = std::max<int64_t>(c, 1);
  return counts;
}

std::tuple<at::Tensor, at::Tensor> prumerge_cpu(const at::Tensor& x, const at::Tensor& keys,
                                                const at::Tensor& scores, int64_t knn, bool plus,
                                                bool per_sample) {
  check_prumerge(x, keys, scores, knn);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  if (B == 0)  // M = 2, the fake kernel's minimum (a kept token + the summary)
    return {at::zeros({0, 2, D}, x.options().memory_format(at::MemoryFormat::Contiguous)),
            at::empty({0}, scores.options().dtype(at::kLong))};
  at::Tensor order = rank_order(scores);
  const int64_t* ordp = order.const_data_ptr<int64_t>();

  // Kept tokens per image: the k best in descending-score order, then the PruMerge+ samples.
  at::Tensor s_acc = scores.to(acc_type_of(scores.scalar_type())).contiguous();
  std::vector<int64_t> counts;
  AT_DISPATCH_FLOATING_TYPES(s_acc.scalar_type(), "prumerge_counts", [&] {
    counts = outlier_counts(s_acc.const_data_ptr<scalar_t>(), B, N, per_sample);
  });
  std::vector<std::vector<int64_t>> kept(B);
  std::vector<std::vector<char>> pruned(B, std::vector<char>(N, 1));
  int64_t KM = 0;
  for (int64_t b = 0; b < B; ++b) {
    auto& kb = kept[b];
    kb.assign(ordp + b * N, ordp + b * N + counts[b]);
    for (int64_t i : kb) pruned[b][i] = 0;
    if (plus) {
      const int64_t stride = std::max<int64_t>(1, (N / counts[b]) / 3);  // (fix) the max
      for (int64_t p = 0; p < N - 1; p += stride)
        if (pruned[b][p]) kb.push_back(p);
      for (int64_t i = counts[b]; i < static_cast<int64_t>(kb.size()); ++i) pruned[b][kb[i]] = 0;
    }
    KM = std::max<int64_t>(KM, kb.size());
  }
  const int64_t M = KM + 1;  // + the summary token
  auto lengths = at::empty({B}, scores.options().dtype(at::kLong));
  for (int64_t b = 0; b < B; ++b) lengths.data_ptr<int64_t>()[b] = static_cast<int64_t>(kept[b].size()) + 1;

  // Similarity of every kept token to every token, reference.prumerge_similarity: every key row
  // normalised first, then one product kn[b][kept] @ kn[b].T per image, [K, N].
  at::Tensor kn = l2_normalized(keys);
  std::vector<at::Tensor> sim(B);
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor idx = at::tensor(c10::ArrayRef<int64_t>(kept[b]), scores.options().dtype(at::kLong));
    at::Tensor knb = kn.select(0, b);
    sim[b] = at::matmul(knb.index_select(0, idx), knb.t()).contiguous();
  }

  auto out = at::zeros({B, M, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n_near = std::min(knn, N - 1);  // fewer candidates than knn: all of them
  AT_DISPATCH_FLOATING_TYPES(kn.scalar_type(), "prumerge_cpu_sim", [&] {
    using sim_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prumerge_cpu", [&] {
      using acc_t = compute_t<scalar_t>;
      at::Tensor w_t = s_acc.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // raw scores as weights
      const acc_t* wp = w_t.const_data_ptr<acc_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const int64_t sxb = x.stride(0), sxn = x.stride(1), sxd = x.stride(2);
      scalar_t* op = out.data_ptr<scalar_t>();
      // One task per output row (kept token or summary) keeps both cores busy at batch 1.
      vtk::parallel_for(0, B * M, 1, [&](int64_t r0, int64_t r1) {
        std::vector<std::pair<key_t<sim_t>, int64_t>> cand;
        std::vector<acc_t> acc(D);
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t b = row / M, i = row % M;
          const int64_t K = static_cast<int64_t>(kept[b].size());
          if (i > K) continue;  // zero padding
          const scalar_t* xb = xp + b * sxb;
          const acc_t* wb = wp + b * N;
          auto add = [&](int64_t j, acc_t w) {
            const scalar_t* xr = xb + j * sxn;
            acc_t* a = acc.data();
            if (sxd == 1) {  // the common layout: a loop the compiler vectorises
              for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<acc_t>(xr[d]);
            } else {
              for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<acc_t>(xr[d * sxd]);
            }
          };
          std::fill(acc.begin(), acc.end(), acc_t(0));
          if (i < K) {
            const int64_t me = kept[b][i];
            const sim_t* srow = sim[b].const_data_ptr<sim_t>() + i * N;
            cand.clear();
            for (int64_t j = 0; j < N; ++j)
              if (j != me) cand.push_back({rank_key(srow[j]), j});
            if (n_near < static_cast<int64_t>(cand.size()))
              std::nth_element(cand.begin(), cand.begin() + n_near, cand.end(), ranks_before<key_t<sim_t>>);
            add(me, acc_t(1));
            for (int64_t t = 0; t < n_near; ++t) add(cand[t].second, wb[cand[t].second]);
          } else {  // summary: every pruned token, weighted by its score
            for (int64_t j = 0; j < N; ++j)
              if (pruned[b][j]) add(j, wb[j]);
          }
          scalar_t* o = op + (b * M + i) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
        }
      });
    });
  });
  return {out, lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(vtk, CPU, m) {
  m.impl("vispruner_select", &vispruner_select_cpu);
  m.impl("prumerge", &prumerge_cpu);
}

}  // namespace vtk
