// Types shared by the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/rank_key.h"

namespace vtk {

// at::parallel_for whose workers run with the caller's thread-local state (grad mode, inference
// mode, dispatch keys). The kernels run tensor ops inside their workers, and OpenMP threads keep
// the defaults: under torch.inference_mode() a tensor the caller made is an inference tensor, and
// an in-place op on it from a worker outside inference mode fails.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain_size, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

// Accumulation: float64 stays float64, every other float dtype computes in float32 (exact
// widening for half and bfloat16).
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The ranking key of a score of type scalar_t (rank_key.h): 32 bits, or 64 for double.
template <typename scalar_t>
using key_t = decltype(rank_key(compute_t<scalar_t>()));

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The tie rule on (key, position) pairs: higher key first, equal keys lower position first.
template <typename K>
bool ranks_before(const std::pair<K, int64_t>& a, const std::pair<K, int64_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// buf = (rank key, position) for the N scores of one (strided) row.
template <typename scalar_t>
void keyed_row(const scalar_t* s, int64_t stride, int64_t N,
               std::vector<std::pair<key_t<scalar_t>, int64_t>>& buf) {
  buf.resize(N);
  for (int64_t i = 0; i < N; ++i) buf[i] = {rank_key(static_cast<compute_t<scalar_t>>(s[i * stride])), i};
}

}  // namespace vtk
