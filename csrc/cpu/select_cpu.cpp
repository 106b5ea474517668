// CPU kernels of the selection ops: topk_indices, gather_tokens, fopru_select.
//
// Ranking uses rank_key (common/rank_key.h) and breaks ties by position, so indices are
// bit-identical to the Triton and CUDA kernels. One row (image) per task: select, restore
// raster order, and (fopru_select) copy the kept rows, all while the row is in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"
#include "../common/rank_key.h"

namespace vtk {
namespace {

// The k best of n keyed entries, written to out in ascending position order.
template <typename K>
void best_k(std::vector<std::pair<K, int64_t>>& buf, int64_t k, int64_t* out) {
  if (k < static_cast<int64_t>(buf.size()))
    std::nth_element(buf.begin(), buf.begin() + k, buf.end(), ranks_before<K>);
  for (int64_t i = 0; i < k; ++i) out[i] = buf[i].second;
  std::sort(out, out + k);
}

template <typename scalar_t>
void topk_row(const scalar_t* s, int64_t stride, int64_t N, int64_t k, int64_t* out,
              std::vector<std::pair<key_t<scalar_t>, int64_t>>& buf) {
  keyed_row(s, stride, N, buf);
  best_k(buf, k, out);
}

// FoPru row strategy (ALGORITHMS.md): whole rows by row sum, then the best of the next row.
// Row sums are float64, added left to right, as on every backend.
template <typename scalar_t>
void fopru_row_row(const scalar_t* s, int64_t stride, int64_t N, int64_t W, int64_t keep, int64_t* out,
                   std::vector<std::pair<uint64_t, int64_t>>& rows,
                   std::vector<std::pair<key_t<scalar_t>, int64_t>>& buf) {
  const int64_t H = N / W, full = keep / W, rem = keep % W;
  rows.resize(H);
  for (int64_t r = 0; r < H; ++r) {
    double sum = 0.0;
    for (int64_t w = 0; w < W; ++w) sum += static_cast<double>(s[(r * W + w) * stride]);
    rows[r] = {rank_key(sum), r};
  }
  const int64_t ranked = full + (rem ? 1 : 0);  // rem > 0 implies full < H
  std::partial_sort(rows.begin(), rows.begin() + ranked, rows.end(), ranks_before<uint64_t>);
  std::vector<char> taken(H, 0);
  for (int64_t i = 0; i < full; ++i) taken[rows[i].second] = 1;
  const int64_t partial = rem ? rows[full].second : -1;
  std::vector<int64_t> within(rem);
  if (rem) topk_row(s + partial * W * stride, stride, W, rem, within.data(), buf);
  int64_t n = 0;
  for (int64_t r = 0; r < H; ++r) {  // raster order
    if (taken[r]) {
      for (int64_t w = 0; w < W; ++w) out[n++] = r * W + w;
    } else if (r == partial) {
      for (int64_t j = 0; j < rem; ++j) out[n++] = r * W + within[j];
    }
  }
}

template <typename scalar_t>
void copy_rows(const scalar_t* x, int64_t sN, int64_t sD, int64_t D, const int64_t* idx, int64_t k,
               scalar_t* out) {
  for (int64_t j = 0; j < k; ++j) {
    const scalar_t* src = x + idx[j] * sN;
    scalar_t* dst = out + j * D;
    if (sD == 1) {
      std::memcpy(dst, src, D * sizeof(scalar_t));
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d * sD];
    }
  }
}

at::Tensor topk_indices_cpu(const at::Tensor& scores, int64_t k) {
  check_scores(scores);
  const int64_t B = scores.size(0), N = scores.size(1);
  check_count("k", k, N);
  auto out = at::empty({B, k}, scores.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_indices_cpu", [&] {
    const scalar_t* sp = scores.const_data_ptr<scalar_t>();
    const int64_t sb = scores.stride(0), sn = scores.stride(1);
    vtk::parallel_for(0, B, grain_for(N), [&](int64_t b0, int64_t b1) {
      std::vector<std::pair<key_t<scalar_t>, int64_t>> buf;
      for (int64_t b = b0; b < b1; ++b) topk_row(sp + b * sb, sn, N, k, op + b * k, buf);
    });
  });
  return out;
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& indices) {
  check_gather(x, indices);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), k = indices.size(1);
  check_gather_range(indices, N);
  at::Tensor idx = indices.to(at::kLong).contiguous();
  auto out = at::empty({B, k, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    vtk::parallel_for(0, B, grain_for(k * D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        copy_rows(xp + b * x.stride(0), x.stride(1), x.stride(2), D, ip + b * k, k, op + b * k * D);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fopru_select_cpu(const at::Tensor& x, const at::Tensor& scores,
                                                    int64_t keep, c10::string_view strategy,
                                                    int64_t grid_width) {
  const std::string strat(strategy);
  check_fopru_select(x, scores, keep, strat, grid_width);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const bool row = strat == "row";
  const int64_t W = row ? grid_width_of(N, grid_width) : 0;
  auto idx = at::empty({B, keep}, scores.options().dtype(at::kLong));
  auto out = at::empty({B, keep, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "fopru_select_cpu", [&] {
    using s_t = scalar_t;
    const s_t* sp = scores.const_data_ptr<s_t>();
    const int64_t sb = scores.stride(0), sn = scores.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fopru_select_cpu_x", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      vtk::parallel_for(0, B, grain_for(N + keep * D), [&](int64_t b0, int64_t b1) {
        std::vector<std::pair<key_t<s_t>, int64_t>> buf;
        std::vector<std::pair<uint64_t, int64_t>> rows;
        for (int64_t b = b0; b < b1; ++b) {
          if (row) {
            fopru_row_row(sp + b * sb, sn, N, W, keep, ip + b * keep, rows, buf);
          } else {
            topk_row(sp + b * sb, sn, N, keep, ip + b * keep, buf);
          }
          copy_rows(xp + b * x.stride(0), x.stride(1), x.stride(2), D, ip + b * keep, keep, op + b * keep * D);
        }
      });
    });
  });
  return {out, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(vtk, CPU, m) {
  m.impl("topk_indices", &topk_indices_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("fopru_select", &fopru_select_cpu);
}

}  // namespace vtk
