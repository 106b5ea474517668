// Ranking keys shared by every C++ and CUDA kernel (no torch headers: nvcc compiles this alone).
//
// The universal tie rule of ALGORITHMS.md: higher score first, equal scores keep the lower
// position first. NaN ranks below every number (below -inf) and -0.0 equals +0.0, so a score
// maps to an unsigned key whose integer order is the ranking order; ties are then broken by
// position, never by the key.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VTK_HD __host__ __device__ __forceinline__
#else
#define VTK_HD inline
#endif

namespace vtk {

VTK_HD uint32_t rank_key(float f) {
  if (f != f) return 0u;      // NaN: lowest key (-inf maps to 0x007FFFFF)
  if (f == 0.0f) f = 0.0f;    // -0.0 -> +0.0
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(f);
#else
  std::memcpy(&b, &f, sizeof(b));
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

VTK_HD uint64_t rank_key(double f) {
  if (f != f) return 0ull;
  if (f == 0.0) f = 0.0;
  uint64_t b;
#if defined(__CUDA_ARCH__)
  b = static_cast<uint64_t>(__double_as_longlong(f));
#else
  std::memcpy(&b, &f, sizeof(b));
#endif
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

}  // namespace vtk
