// CPU kernel of attention_received_varlen: the attention each token receives from the queries of
// its own segment (image), averaged over heads and those queries, for images packed along one
// sequence (q, k [S, C], segments cu_seqlens [n + 1], as the Qwen-VL towers pass them).
//
// Never forms an [H, S, S] map and never pads segments to the longest. The work is split into
// tasks (segment, head, chunk of query rows); a task walks its chunk in blocks of query rows:
// logits of a block against the segment's keys (one BLAS GEMM on a tile of at most kTileBytes),
// softmax per row, then the block's column sums added into the task's own slot of a partial
// buffer [kMaxChunks, H, S]. Chunk boundaries depend only on the segment length, never on the
// thread count, and the partial sums are reduced in a fixed order (chunks, then heads), so the
// result is the same for any number of threads.
// float64 inputs accumulate in float64; every other dtype in float32. Output is float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "cpu_common.h"

namespace vtk {
namespace {

// Logits tile per query block: 1 MiB (a few per thread stay in L2/L3 while the softmax passes
// run over them). A segment of n keys takes blocks of tile / n query rows, between kMinRows and
// kMaxRows; a segment so long that kMinRows rows do not fit (n > 16384 in float32, 8192 in
// float64) switches to two passes over key chunks (row max and sum first, then the column sums),
// which computes each logit twice but keeps the tile bounded for any n.
constexpr int64_t kTileBytes = int64_t(1) << 20;
constexpr int64_t kMinRows = 16;
constexpr int64_t kMaxRows = 128;
constexpr int64_t kTwoPassRows = 64;
// Query rows of one (segment, head) are split into at most kMaxChunks chunks of at least
// kChunkRows rows: enough tasks to balance the threads on a single image, and a partial buffer
// of kMaxChunks * H * S entries (2.8 MB for the Qwen2.5-VL tower at S = 5476).
constexpr int64_t kMaxChunks = 8;
constexpr int64_t kChunkRows = 128;

// exp of a float32 logits tile, row by row: lg[i, j] = exp(lg[i, j] - m[i]). The exps are a
// third of the kernel's time, and torch's exp here (MKL's vector exp, or Sleef in softmax) runs
// at about 1 ns per element; an AVX2 + FMA loop of our own does 2-3x better. It reduces
// x = k ln2 + r (|r| <= ln2 / 2, ln2 split in two parts so k ln2 is exact), takes exp(r) by its
// Taylor polynomial of degree 7 (truncation below 6e-9) and 2^k from the exponent bits:
// measured within 1.3 ulp of exp in double over [-90, 0]. x < -87 gives 0 (the true value is
// below 1.7e-38, nothing next to the row max's exp(0) = 1); NaN stays NaN. float64 (the
// exactness mode) and CPUs without AVX2 use torch's exp.
#if defined(__GNUC__) && defined(__x86_64__)
#define VTK_HAVE_AVX2_EXP 1
__attribute__((target("avx2,fma"))) void exp_shifted_avx2(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);  // 8 significant bits: k * ln2_hi is exact
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 c[6] = {_mm256_set1_ps(1.0f / 5040), _mm256_set1_ps(1.0f / 720), _mm256_set1_ps(1.0f / 120),
                       _mm256_set1_ps(1.0f / 24), _mm256_set1_ps(1.0f / 6), _mm256_set1_ps(0.5f)};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256 under = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
    const __m256 t = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(t, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, t));
    __m256 p = c[0];
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, c[i]);
    p = _mm256_fmadd_ps(_mm256_fmadd_ps(p, r, one), r, one);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
    _mm256_storeu_ps(x + j, _mm256_blendv_ps(y, v, nan));
  }
  for (; j < n; ++j) x[j] = std::exp(x[j] - m);
}

bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// lg [nr, nc] contiguous, m [nr, 1]: lg = exp(lg - m), in place.
void exp_shifted_rows(const at::Tensor& lg, const at::Tensor& m) {
#ifdef VTK_HAVE_AVX2_EXP
  if (lg.scalar_type() == at::kFloat && cpu_has_avx2_fma()) {
    const at::Tensor mc = m.contiguous();
    float* x = lg.data_ptr<float>();
    const float* mp = mc.data_ptr<float>();
    const int64_t nr = lg.size(0), nc = lg.size(1);
    for (int64_t i = 0; i < nr; ++i) exp_shifted_avx2(x + i * nc, nc, mp[i]);
    return;
  }
#endif
  lg.sub_(m).exp_();
}

// head_dim ** -0.5 as Python computes it (pow): 1 / sqrt differs in the last bit for many
// head dims (8, 80, ...), and float64 results should equal the reference's.
double resolve_scale(c10::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : std::pow(static_cast<double>(head_dim), -0.5);
}

// The checks of vtkernels/_validate.py: check_varlen (no data) ...
void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                  int64_t num_heads, c10::optional<double> scale) {
  check_float(q, "q");
  check_float(k, "k");
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == cu_seqlens.device(),
                    "tensors must be on one device: q on ", q.device(), ", k on ", k.device(),
                    ", cu_seqlens on ", cu_seqlens.device());
  TORCH_CHECK_VALUE(q.dim() == 2, "q must be [S, C], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 2, "k must be [S, C], got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.sizes() == k.sizes(), "q and k must have the same shape, got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype, got q ",
                    q.scalar_type(), " and k ", k.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
                    "cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    "cu_seqlens must be [n + 1] (1-D, at least one entry), got shape ", cu_seqlens.sizes());
  const int64_t C = q.size(1);
  TORCH_CHECK_VALUE(num_heads >= 1 && C % num_heads == 0, "num_heads=", num_heads,
                    " must be >= 1 and divide the channel count C=", C);
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), "scale must be finite, got ", *scale);
}

// ... and check_cu_seqlens_values (the values); returns them.
std::vector<int64_t> cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t S) {
  at::Tensor c = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> cu(p, p + c.numel());
  bool ok = cu.front() == 0 && cu.back() == S;
  for (size_t i = 1; ok && i < cu.size(); ++i) ok = cu[i] >= cu[i - 1];
  if (!ok) {
    // The message shows the values as Python's check does: all of them, or 4 ... 3.
    std::ostringstream shown;
    shown << "[";
    const size_t m = cu.size();
    for (size_t i = 0; i < m; ++i) {
      if (m > 8 && i == 4) {
        shown << "'...', ";
        i = m - 3;
      }
      shown << cu[i] << (i + 1 < m ? ", " : "");
    }
    shown << "]";
    TORCH_CHECK_VALUE(false, "cu_seqlens must start at 0, be non-decreasing and end at S=", S, ", got ",
                      shown.str());
  }
  return cu;
}

// col[j] += sum over query rows i in [r0, r1) of softmax_j(scale * qh[i] . kh[j]), for one segment
// and head: qh, kh [n, dh] (unit channel stride, any row stride), col [n], all in the
// accumulation dtype. buf: the calling thread's logits tile, kTileBytes long.
void block_column_sums(const at::Tensor& qh, const at::Tensor& kh, double scale, int64_t r0, int64_t r1,
                       at::Tensor col, const at::Tensor& buf) {
  const int64_t n = kh.size(0);
  const int64_t tile = buf.numel();
  const at::Tensor kt = kh.t();  // [dh, n]: BLAS reads k transposed in place, no copy
  if (n * kMinRows <= tile) {
    // One pass: the block's logits against all n keys fit in the tile, so each row's softmax is
    // final once computed (max, exp in place, sum), and the column sums of the block are one
    // GEMV with the rows' reciprocal sums: col += P^T 1 = E^T (1 / rowsum).
    const int64_t bm = std::clamp(tile / n, kMinRows, kMaxRows);
    for (int64_t i0 = r0; i0 < r1; i0 += bm) {
      const int64_t nr = std::min(bm, r1 - i0);
      at::Tensor lg = buf.narrow(0, 0, nr * n).view({nr, n});
      // Scaling q (nr x dh) instead of the logits (nr x n): one rounding more or less per logit,
      // far below the accumulation error, and no extra pass over the tile.
      at::mm_out(lg, qh.narrow(0, i0, nr).mul(scale), kt);
      exp_shifted_rows(lg, at::amax(lg, {1}, true));
      col.addmv_(lg.t(), lg.sum(1).reciprocal_());
    }
    return;
  }
  // Two passes over key chunks of bn: online row max m and sum l (l rescaled by exp(m_old - m_new)
  // when the max grows), then the logits again, exp(logit - m) / l into the column sums.
  const int64_t bm = kTwoPassRows, bn = tile / bm;
  for (int64_t i0 = r0; i0 < r1; i0 += bm) {
    const int64_t nr = std::min(bm, r1 - i0);
    at::Tensor qs = qh.narrow(0, i0, nr).mul(scale);
    at::Tensor m = at::full({nr, 1}, -std::numeric_limits<double>::infinity(), qh.options());
    at::Tensor l = at::zeros({nr, 1}, qh.options());
    for (int64_t j0 = 0; j0 < n; j0 += bn) {
      const int64_t nc = std::min(bn, n - j0);
      at::Tensor lg = buf.narrow(0, 0, nr * nc).view({nr, nc});  // contiguous: BLAS writes it directly
      at::mm_out(lg, qs, kt.narrow(1, j0, nc));
      at::Tensor m_new = at::maximum(m, at::amax(lg, {1}, true));
      // The first chunk holds a real key, so m_new is finite from there on (finite inputs) and
      // exp(m - m_new) never sees inf - inf.
      exp_shifted_rows(lg, m_new);
      l.mul_((m - m_new).exp_()).add_(lg.sum(1, true));
      m = m_new;
    }
    at::Tensor inv = l.reciprocal_().squeeze(1);
    for (int64_t j0 = 0; j0 < n; j0 += bn) {
      const int64_t nc = std::min(bn, n - j0);
      at::Tensor lg = buf.narrow(0, 0, nr * nc).view({nr, nc});
      at::mm_out(lg, qs, kt.narrow(1, j0, nc));
      exp_shifted_rows(lg, m);
      col.narrow(0, j0, nc).addmv_(lg.t(), inv);
    }
  }
}

struct Task {
  int64_t start, len, head, chunk, r0, r1;
};

at::Tensor attention_received_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                         int64_t num_heads, c10::optional<double> scale) {
  check_varlen(q, k, cu_seqlens, num_heads, scale);
  // Scores have no gradient (the op has no autograd formula); without this, inputs that require
  // grad reach the ops below recording a graph, and mm_out refuses them.
  at::NoGradGuard no_grad;
  const int64_t S = q.size(0), C = q.size(1), H = num_heads, dh = C / H;
  const std::vector<int64_t> cu = cu_seqlens_values(cu_seqlens, S);
  const double sc = resolve_scale(scale, dh);
  const auto acc = acc_type_of(q.scalar_type());
  if (S == 0) return at::empty({0}, q.options().dtype(at::kFloat));

  // Operands as BLAS takes them: float32/float64 views with unit channel stride (e.g. q, k
  // sliced out of a fused qkv) are used in place; anything else is converted once.
  auto operand = [&](const at::Tensor& t) {
    return (t.scalar_type() == acc && t.stride(1) == 1) ? t : t.to(acc, false, false, at::MemoryFormat::Contiguous);
  };
  const at::Tensor qa = operand(q), ka = operand(k);

  std::vector<Task> tasks;
  double work = 0.0;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t start = cu[s], len = cu[s + 1] - cu[s];
    if (len == 0) continue;
    const int64_t chunks = std::min(kMaxChunks, (len + kChunkRows - 1) / kChunkRows);
    const int64_t rows = (len + chunks - 1) / chunks;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < chunks; ++c)
        if (c * rows < len) tasks.push_back({start, len, h, c, c * rows, std::min(len, (c + 1) * rows)});
    work += static_cast<double>(len) * len * C;
  }
  // Longest tasks first, so that the threads finish together (each task writes only its own
  // slot, so the order changes nothing in the result).
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    return (a.r1 - a.r0) * a.len > (b.r1 - b.r0) * b.len;
  });

  at::Tensor part = at::zeros({kMaxChunks, H, S}, q.options().dtype(acc));
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  // Threads pull tasks from a shared counter (tasks differ in cost: images of different sizes);
  // each thread allocates its logits tile once. A small problem runs inline (a grain of the whole
  // range), with the ops inside single-threaded as on a worker: waking the thread pool would cost
  // more than it gives.
  const bool small = ntasks == 1 || work < static_cast<double>(at::internal::GRAIN_SIZE);
  const int64_t workers = small ? 1 : std::min<int64_t>(at::get_num_threads(), ntasks);
  std::atomic<int64_t> next{0};
  vtk::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::Tensor buf = at::empty({kTileBytes / static_cast<int64_t>(c10::elementSize(acc))}, q.options().dtype(acc));
    for (int64_t i = next++; i < ntasks; i = next++) {
      const Task& t = tasks[i];
      block_column_sums(qa.narrow(0, t.start, t.len).narrow(1, t.head * dh, dh),
                        ka.narrow(0, t.start, t.len).narrow(1, t.head * dh, dh), sc, t.r0, t.r1,
                        part[t.chunk][t.head].narrow(0, t.start, t.len), buf);
    }
  });

  // Fixed-order reduction: chunks, then heads (element-wise adds, independent of threads), then
  // the mean over the H heads and the segment's len queries.
  at::Tensor total = part[0][0].clone();
  for (int64_t c = 0; c < kMaxChunks; ++c)
    for (int64_t h = (c == 0 ? 1 : 0); h < H; ++h) total.add_(part[c][h]);
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t len = cu[s + 1] - cu[s];
    if (len > 0) total.narrow(0, cu[s], len).div_(static_cast<double>(H) * static_cast<double>(len));
  }
  return total.to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(vtk, CPU, m) {
  m.impl("attention_received_varlen", &attention_received_varlen_cpu);
}

}  // namespace vtk
