// Types shared by the CPU kernels.
#pragma once
#include <ATen/ATen.h>

#include <type_traits>

#include "../common/rank_key.h"

namespace vtk {

// Accumulation: float64 stays float64, every other float dtype computes in float32 (exact
// widening for half and bfloat16).
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The ranking key of a score of type scalar_t (rank_key.h): 32 bits, or 64 for double.
template <typename scalar_t>
using key_t = decltype(rank_key(compute_t<scalar_t>()));

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace vtk
