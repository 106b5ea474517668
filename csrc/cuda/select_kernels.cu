// CUDA kernels of the selection ops. One block per image row: the row's ranking keys are made
// once (kept in shared memory when they fit), the k-th best key is found by a radix select
// (8 bits per pass, one block histogram per pass), and one ordered pass with a block-wide prefix
// scan writes the selected positions in raster order. There is no sort, the selection is exact,
// and ties resolve by position because the final pass visits positions in order: the same
// result as csrc/cpu/select_cpu.cpp, bit for bit. The gather (gather_tokens, and fopru_select
// after its selection kernel) is a separate grid of warps, each copying a segment of one output
// row in 16-byte words: a block per image would leave most of the GPU idle at small batches.
#include "select_kernels.cuh"

#include "../common/rank_key.h"

namespace vtk {
namespace gpu {
namespace {

// Selection blocks have up to 1024 threads. Their kernels say __launch_bounds__(kMaxThreads, 1):
// with the bare bound, nvcc 13 gives sm_90 code 32 registers a thread and spills; one block of
// 1024 threads may use 64, and the kernels need up to about 62.
constexpr int kMaxThreads = 1024;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
// Keys are cached in dynamic shared memory up to this size, which keeps every block under the
// 48 KiB it gets without cudaFuncSetAttribute (kept off the launch path so that launches stay
// plain and capturable in CUDA graphs). Longer rows (over 9216 float-like or 4608 double scores)
// re-read their scores from global memory, where they sit in L2 after the first pass.
constexpr size_t kKeyCacheBytes = 36 * 1024;
// The gather: 256-thread blocks, kCopyUnroll loads in flight per lane, segments of at least one
// full unrolled step of a warp, work for about kGatherWarpsPerSm warps per SM, and a grid of at
// most 8 blocks per SM (2048 threads, what an A100 or H100 SM can hold) looping over the work.
constexpr int kGatherThreads = 256;
constexpr int kCopyUnroll = 4;
constexpr int64_t kCopyMinSeg = 32 * kCopyUnroll;
constexpr int64_t kGatherWarpsPerSm = 32;
constexpr int64_t kGatherBlocksPerSm = 2048 / kGatherThreads;

// ---- ranking keys -----------------------------------------------------------------------------

__host__ __device__ __forceinline__ uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// vtk::rank_key(float), computed on the bits. setup.py builds with --use_fast_math, under which
// nvcc flushes subnormal operands of float comparisons to zero (setp.ftz): rank_key's
// `f == 0.0f` would tie every subnormal score with 0 and disagree with the CPU kernel. Integer
// comparisons are immune to that.
__host__ __device__ __forceinline__ uint32_t float_key(float f) {
  uint32_t b = float_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN ranks below everything
  if ((b & 0x7fffffffu) == 0u) b = 0u;              // -0.0 ties with +0.0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// float -> double, exact for subnormals too: fast math also flushes them in the conversion
// (cvt.ftz.f64.f32), which would change FoPru's float64 row sums.
__host__ __device__ __forceinline__ double exact_double(float f) {
  const uint32_t b = float_bits(f);
  if ((b & 0x7f800000u) != 0u) return static_cast<double>(f);
  const double m = static_cast<double>(b & 0x007fffffu) * 0x1p-149;  // both steps exact
  return (b & 0x80000000u) ? -m : m;
}

__device__ __forceinline__ float to_float(float s) { return s; }
__device__ __forceinline__ float to_float(__half s) { return __half2float(s); }
__device__ __forceinline__ float to_float(__nv_bfloat16 s) { return __bfloat162float(s); }

// Scores rank as float, or as double for double scores (as on the CPU).
template <typename S>
__device__ __forceinline__ uint32_t score_key(S s) { return float_key(to_float(s)); }
__device__ __forceinline__ uint64_t score_key(double s) { return rank_key(s); }

template <typename S>
__device__ __forceinline__ double score_double(S s) { return exact_double(to_float(s)); }
__device__ __forceinline__ double score_double(double s) { return s; }

template <typename S>
struct KeyType { using type = uint32_t; };
template <>
struct KeyType<double> { using type = uint64_t; };

// Where a block reads key i of its row: recomputed from global memory, or from the cache.
template <typename S>
struct ScoreKeys {
  const S* row;
  int64_t stride;
  __device__ typename KeyType<S>::type operator()(int64_t i) const { return score_key(row[i * stride]); }
};

// FoPru row strategy: the key of grid row r is that of its float64 sum, added left to right
// exactly as every other backend adds it.
template <typename S>
struct RowSumKeys {
  const S* row;
  int64_t stride;
  int64_t width;
  __device__ uint64_t operator()(int64_t r) const {
    const S* p = row + r * width * stride;
    double sum = 0.0;
    for (int64_t w = 0; w < width; ++w) sum += score_double(p[w * stride]);
    return rank_key(sum);
  }
};

template <typename K>
struct CachedKeys {
  const K* keys;
  __device__ K operator()(int64_t i) const { return keys[i]; }
};

// ---- block-wide building blocks -----------------------------------------------------------------

using u64 = unsigned long long;

struct SelectShared {
  uint32_t hist[kBins];
  u64 scan[32];
  uint32_t digit;
  uint32_t krem;
};

// Exclusive prefix sum of v in thread order; total gets the block's sum. Every thread of the
// block calls it (it synchronises); blockDim.x is a multiple of 32.
__device__ u64 block_exclusive_sum(u64 v, u64* scratch, u64& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  u64 x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    u64 w = lane < nwarps ? scratch[lane] : 0ull;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < nwarps) scratch[lane] = w;
  }
  __syncthreads();
  const u64 before = (warp ? scratch[warp - 1] : 0ull) + x - v;
  total = scratch[nwarps - 1];
  __syncthreads();  // scratch is reused by the next call
  return before;
}

// The k best of n keys are those above `key` plus the first `need` (in position order) equal to
// it: the tie rule, with ranking by key and then by lower position.
template <typename K>
struct Threshold {
  K key;
  uint32_t need;
};

// Radix select of the k-th best key, most significant digit first. Each pass histograms the digit
// of the keys that still match the prefix chosen so far and picks the bin holding the k-th best.
template <typename K, typename Keys>
__device__ Threshold<K> find_threshold(const Keys& keys, int64_t n, uint32_t k, SelectShared& sh) {
  const int lane = threadIdx.x & 31;
  K prefix = 0, mask = 0;
  uint32_t krem = k;  // rank of the sought key among the keys matching prefix
  for (int shift = 8 * static_cast<int>(sizeof(K)) - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh.hist[i] = 0u;
    __syncthreads();
    for (int64_t base = 0; base < n; base += blockDim.x) {  // uniform trip count: full warps below
      const int64_t i = base + threadIdx.x;
      uint32_t bin = kBins;  // not counted
      if (i < n) {
        const K key = keys(i);
        if ((key & mask) == prefix) bin = static_cast<uint32_t>(key >> shift) & (kBins - 1);
      }
      // Ties are common (all-equal rows, zeros, -inf padding): one atomic per distinct bin per
      // warp, instead of 32 serialised on the same shared-memory word.
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin < kBins && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[bin], static_cast<uint32_t>(__popc(peers)));
    }
    __syncthreads();
    // Thread t looks at bin kBins-1-t, so the exclusive sum counts the keys in higher bins.
    const int t = threadIdx.x;
    const uint32_t c = t < kBins ? sh.hist[kBins - 1 - t] : 0u;
    u64 total;
    const u64 above = block_exclusive_sum(c, sh.scan, total);
    if (t < kBins && above < krem && krem <= above + c) {
      sh.digit = static_cast<uint32_t>(kBins - 1 - t);
      sh.krem = static_cast<uint32_t>(krem - above);
    }
    __syncthreads();
    prefix |= static_cast<K>(sh.digit) << shift;
    mask |= static_cast<K>(kBins - 1) << shift;
    krem = sh.krem;
  }
  return {prefix, krem};
}

__device__ __forceinline__ u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

// Counts of keys above / equal to the threshold at the positions before some position.
struct Counts {
  u64 gt, eq;
};

// The one ordered pass of every selection: visits positions 0, 1, ... of n keys, a chunk of
// blockDim.x at a time, until the `wanted` best have been seen (the keys above th.key and the
// first th.need equal to it). A block-wide scan of (greater, equal) flags, packed in one 64-bit
// word, gives each position the counts before it. visit(i, gt, before, chunk) runs for each
// position whose key is above or equal to the threshold (chunk: the counts before the chunk);
// chunk_end(chunk, after) runs in every thread after each chunk (it may synchronise the block).
template <typename K, typename Keys, typename Visit, typename ChunkEnd>
__device__ void scan_in_order(const Keys& keys, int64_t n, u64 wanted, Threshold<K> th, SelectShared& sh,
                              const Visit& visit, const ChunkEnd& chunk_end) {
  Counts run{0, 0};  // counts over the chunks before; the same in every thread
  for (int64_t base = 0; base < n && run.gt + min_u64(run.eq, th.need) < wanted; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    bool gt = false, eq = false;
    if (i < n) {
      const K key = keys(i);
      gt = key > th.key;
      eq = key == th.key;
    }
    u64 total;
    const u64 before = block_exclusive_sum((static_cast<u64>(gt) << 32) | static_cast<u64>(eq), sh.scan, total);
    const Counts chunk = run;
    if (gt || eq) visit(i, gt, Counts{chunk.gt + (before >> 32), chunk.eq + (before & 0xffffffffull)}, chunk);
    run.gt += total >> 32;
    run.eq += total & 0xffffffffull;
    chunk_end(chunk, run);
  }
}

// Writes the positions of the k best keys, ascending, as out[j] = pos_base + i.
template <typename K, typename Keys>
__device__ void write_selected(const Keys& keys, int64_t n, uint32_t k, Threshold<K> th, int64_t* out,
                               int64_t pos_base, SelectShared& sh) {
  const u64 need = th.need;
  scan_in_order(
      keys, n, k, th, sh,
      [&](int64_t i, bool gt, Counts b, Counts) {
        if (gt || b.eq < need) out[b.gt + min_u64(b.eq, need)] = pos_base + i;
      },
      [](Counts, Counts) {});
}

// topk of one row: out[0, k) = pos_base + the positions of the k best of row[0, n), ascending.
template <typename S>
__device__ void best_k(const S* row, int64_t stride, int64_t n, uint32_t k, int64_t* out, int64_t pos_base,
                       unsigned char* cache, size_t cache_bytes, SelectShared& sh) {
  using K = typename KeyType<S>::type;
  const ScoreKeys<S> from_global{row, stride};
  if (static_cast<size_t>(n) * sizeof(K) <= cache_bytes) {
    K* c = reinterpret_cast<K*>(cache);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) c[i] = from_global(i);
    __syncthreads();
    const CachedKeys<K> keys{c};
    write_selected(keys, n, k, find_threshold<K>(keys, n, k, sh), out, pos_base, sh);
  } else {
    write_selected(from_global, n, k, find_threshold<K>(from_global, n, k, sh), out, pos_base, sh);
  }
}

struct RowShared {
  int32_t row[kMaxThreads];  // full rows of the current chunk: grid row, output offset
  int32_t out[kMaxThreads];
  int64_t partial_row;
  int64_t partial_out;
};

// Full rows of the row strategy: the `full` best rows, each written whole at its raster slot;
// with rem > 0 the next-best row is the partial row, recorded in rs for the caller.
// The `full + (rem > 0)` best rows are the keys above th.key plus the first th.need equal to it,
// and the worst of them is the need-th equal row in position order. So with rem > 0 that row is
// the partial row, and "the partial row lies before row r" is "at least need equal rows before r".
template <typename Keys>
__device__ void write_rows(const Keys& keys, int64_t H, int64_t W, uint32_t full, uint32_t rem,
                           Threshold<uint64_t> th, int64_t* out, SelectShared& sh, RowShared& rs) {
  const u64 need = th.need, ranked = full + (rem ? 1u : 0u);
  auto full_before = [&](Counts c) {  // full rows among the positions counted in c
    return c.gt + min_u64(c.eq, need) - ((rem && c.eq >= need) ? 1u : 0u);
  };
  scan_in_order(
      keys, H, ranked, th, sh,
      [&](int64_t r, bool gt, Counts b, Counts chunk) {
        const u64 fr = full_before(b);
        const int64_t offset = static_cast<int64_t>(fr) * W + ((rem && b.eq >= need) ? rem : 0);
        // rs was last read by the previous chunk's copy, which the barriers of the scan ended.
        if (!gt && rem && b.eq + 1 == need) {  // the partial row
          rs.partial_row = r;
          rs.partial_out = offset;
        } else if (gt || b.eq < need) {
          const u64 e = fr - full_before(chunk);
          rs.row[e] = static_cast<int32_t>(r);
          rs.out[e] = static_cast<int32_t>(offset);
        }
      },
      [&](Counts chunk, Counts after) {
        const int nfull = static_cast<int>(full_before(after) - full_before(chunk));
        __syncthreads();
        // The whole block writes the chunk's full rows, so that a wide row is not left to one thread.
        const int w32 = static_cast<int>(W);
        for (int t = threadIdx.x; t < nfull * w32; t += blockDim.x) {
          const int e = t / w32, w = t - e * w32;
          out[rs.out[e] + w] = static_cast<int64_t>(rs.row[e]) * W + w;
        }
      });
}

// FoPru row strategy (ALGORITHMS.md): the keep / W best grid rows whole, then the best keep % W
// tokens of the next-best row; out[0, keep) ascending.
template <typename S>
__device__ void fopru_rows(const S* row, int64_t stride, int64_t N, int64_t W, uint32_t keep, int64_t* out,
                           unsigned char* cache, size_t cache_bytes, SelectShared& sh, RowShared& rs) {
  const int64_t H = N / W;
  const uint32_t full = static_cast<uint32_t>(keep / W), rem = static_cast<uint32_t>(keep % W);
  const uint32_t ranked = full + (rem ? 1u : 0u);  // rem > 0 implies full < H
  const RowSumKeys<S> from_global{row, stride, W};
  if (static_cast<size_t>(H) * sizeof(uint64_t) <= cache_bytes) {
    uint64_t* c = reinterpret_cast<uint64_t*>(cache);
    for (int64_t r = threadIdx.x; r < H; r += blockDim.x) c[r] = from_global(r);
    __syncthreads();
    const CachedKeys<uint64_t> keys{c};
    write_rows(keys, H, W, full, rem, find_threshold<uint64_t>(keys, H, ranked, sh), out, sh, rs);
  } else {
    write_rows(from_global, H, W, full, rem, find_threshold<uint64_t>(from_global, H, ranked, sh), out, sh, rs);
  }
  if (rem) {
    __syncthreads();  // the partial row is known, and the cache is free for its keys
    const int64_t r = rs.partial_row;
    best_k(row + r * W * stride, stride, W, rem, out + rs.partial_out, r * W, cache, cache_bytes, sh);
  }
}

// ---- the gather ----------------------------------------------------------------------------------

// One work unit of the gather: words [d0, d0 + seg) of output row `row` (of B * k rows), copied
// by one warp. A word is 16 bytes (uint4) when every row is 16-byte aligned, else one element.
// Each lane keeps kCopyUnroll loads in flight before it stores them: the loads and stores of one
// lane no longer alternate (x and out never overlap: __restrict__), so a warp has 32 *
// kCopyUnroll words in flight. Rows split into segments when there are few of them (B = 1), so
// that every SM gets warps.
template <typename Word>
__global__ void __launch_bounds__(kGatherThreads)
    gather_rows_kernel(const Word* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxd, int64_t N, int64_t D,
                       const int64_t* __restrict__ idx, int64_t sib, int64_t sik, int64_t k, int64_t seg,
                       int64_t nseg, int64_t units, Word* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); u < units;
       u += warps) {
    const int64_t row = u / nseg, d0 = (u - row * nseg) * seg;
    const int64_t d1 = d0 + seg < D ? d0 + seg : D;
    const int64_t b = row / k, j = row - b * k;
    const int64_t r = idx[b * sib + j * sik];
    Word* __restrict__ dst = out + row * D;
    if (r >= 0 && r < N) {
      const Word* __restrict__ src = x + b * sxb + r * sxn;
      for (int64_t d = d0 + lane; d < d1; d += 32 * kCopyUnroll) {
        Word w[kCopyUnroll];
#pragma unroll
        for (int t = 0; t < kCopyUnroll; ++t)
          if (d + 32 * t < d1) w[t] = src[(d + 32 * t) * sxd];
#pragma unroll
        for (int t = 0; t < kCopyUnroll; ++t)
          if (d + 32 * t < d1) dst[d + 32 * t] = w[t];
      }
    } else {  // an index outside [0, N): a row of zeros, x is never read
      for (int64_t d = d0 + lane; d < d1; d += 32) dst[d] = Word{};
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sizes the gather in words of type Word (strides of x in words too): enough warps for every SM
// (rows split into segments of at least kCopyMinSeg words when there are few), at most
// kGatherBlocksPerSm resident blocks per SM, which loop over the units.
template <typename Word>
void launch_gather_rows(const Word* x, int64_t sxb, int64_t sxn, int64_t sxd, int64_t B, int64_t N, int64_t D,
                        const int64_t* idx, int64_t sib, int64_t sik, int64_t k, Word* out, int sm_count,
                        cudaStream_t stream) {
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  const int64_t rows = B * k;
  const int64_t want_per_row = ceil_div(sms * kGatherWarpsPerSm, rows);  // segments that fill the GPU
  int64_t seg = ceil_div(ceil_div(D, want_per_row), 32) * 32;
  if (seg < kCopyMinSeg) seg = kCopyMinSeg;
  const int64_t nseg = ceil_div(D, seg);
  const int64_t units = rows * nseg;
  constexpr int64_t warps_per_block = kGatherThreads / 32;
  const int64_t max_blocks = sms * kGatherBlocksPerSm;
  const int64_t blocks = ceil_div(units, warps_per_block) < max_blocks ? ceil_div(units, warps_per_block) : max_blocks;
  gather_rows_kernel<Word><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
      x, sxb, sxn, sxd, N, D, idx, sib, sik, k, seg, nseg, units, out);
}

// ---- kernels --------------------------------------------------------------------------------------

extern __shared__ __align__(16) unsigned char vtk_key_cache[];

template <typename S>
__global__ void __launch_bounds__(kMaxThreads, 1)
    topk_indices_kernel(const S* scores, int64_t sb, int64_t sn, int64_t N, int64_t k, int64_t* out,
                        size_t cache_bytes) {
  __shared__ SelectShared sh;
  const int64_t b = blockIdx.x;
  best_k(scores + b * sb, sn, N, static_cast<uint32_t>(k), out + b * k, 0, vtk_key_cache, cache_bytes, sh);
}

// FoPru's selection of one image per block; the kept rows are copied by the gather after it
// (a block per image would leave most SMs idle at B = 1).
template <typename S>
__global__ void __launch_bounds__(kMaxThreads, 1)
    fopru_select_kernel(const S* scores, int64_t sb, int64_t sn, int64_t N, int64_t keep, int64_t row_width,
                        int64_t* out_idx, size_t cache_bytes) {
  __shared__ SelectShared sh;
  __shared__ RowShared rs;
  const int64_t b = blockIdx.x;
  int64_t* idx = out_idx + b * keep;
  if (row_width == 0) {
    best_k(scores + b * sb, sn, N, static_cast<uint32_t>(keep), idx, 0, vtk_key_cache, cache_bytes, sh);
  } else {
    fopru_rows(scores + b * sb, sn, N, row_width, static_cast<uint32_t>(keep), idx, vtk_key_cache,
               cache_bytes, sh, rs);
  }
}

// ---- launch helpers -----------------------------------------------------------------------------

// Enough threads to stream long rows, never fewer than the 256 the bin scan needs.
int select_threads(int64_t n) { return n <= 2048 ? 256 : (n <= 16384 ? 512 : kMaxThreads); }

size_t cache_for(int64_t count, size_t key_bytes) {
  const size_t bytes = static_cast<size_t>(count) * key_bytes;
  return bytes <= kKeyCacheBytes ? bytes : 0;
}

// 16-byte copies need every row start 16-byte aligned and whole rows of 16-byte words.
bool can_vectorise(const void* x, int64_t sxb, int64_t sxn, int64_t sxd, int64_t D, size_t elem,
                   const void* out) {
  const int64_t es = static_cast<int64_t>(elem);
  return sxd == 1 && (D * es) % 16 == 0 && (sxn * es) % 16 == 0 && (sxb * es) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

// The stride of a dimension of size 1 is arbitrary (torch leaves whatever a view gave it); it
// must not spoil the alignment test.
void normalise_strides(int64_t B, int64_t N, int64_t D, int64_t& sxb, int64_t& sxn, int64_t& sxd) {
  if (B == 1) sxb = 0;
  if (N == 1) sxn = 0;
  if (D == 1) sxd = 1;
}

// out[b, j, :] = x[b, idx[b, j], :], in 16-byte words where the layout allows it.
template <typename E>
void gather(const E* x, int64_t sxb, int64_t sxn, int64_t sxd, int64_t B, int64_t N, int64_t D, const int64_t* idx,
            int64_t sib, int64_t sik, int64_t k, E* out, int sm_count, cudaStream_t stream) {
  if (B == 0 || k == 0 || D == 0) return;
  normalise_strides(B, N, D, sxb, sxn, sxd);
  if (can_vectorise(x, sxb, sxn, sxd, D, sizeof(E), out)) {
    constexpr int64_t per_word = 16 / sizeof(E);
    launch_gather_rows(reinterpret_cast<const uint4*>(x), sxb / per_word, sxn / per_word, 1, B, N, D / per_word,
                       idx, sib, sik, k, reinterpret_cast<uint4*>(out), sm_count, stream);
  } else {
    launch_gather_rows(x, sxb, sxn, sxd, B, N, D, idx, sib, sik, k, out, sm_count, stream);
  }
}

}  // namespace

template <typename S>
void launch_topk_indices(const S* scores, int64_t sb, int64_t sn, int64_t B, int64_t N, int64_t k,
                         int64_t* out, cudaStream_t stream) {
  if (B == 0) return;
  const size_t cache = cache_for(N, sizeof(typename KeyType<S>::type));
  topk_indices_kernel<S><<<static_cast<unsigned>(B), select_threads(N), cache, stream>>>(scores, sb, sn, N, k,
                                                                                      out, cache);
}

template <typename E>
void launch_gather_tokens(const E* x, int64_t sxb, int64_t sxn, int64_t sxd, int64_t B, int64_t N,
                          int64_t D, const int64_t* idx, int64_t sib, int64_t sik, int64_t k, E* out,
                          int sm_count, cudaStream_t stream) {
  gather(x, sxb, sxn, sxd, B, N, D, idx, sib, sik, k, out, sm_count, stream);
}

template <typename S, typename E>
void launch_fopru_select(const S* scores, int64_t sb, int64_t sn, const E* x, int64_t sxb, int64_t sxn,
                         int64_t sxd, int64_t B, int64_t N, int64_t D, int64_t keep, int64_t row_width,
                         E* out_x, int64_t* out_idx, int sm_count, cudaStream_t stream) {
  if (B == 0) return;
  const size_t key_bytes = sizeof(typename KeyType<S>::type);
  size_t cache = cache_for(N, key_bytes);
  if (row_width > 0) {  // the cache holds the row keys, then the partial row's keys
    const size_t rows = cache_for(N / row_width, sizeof(uint64_t)), cols = cache_for(row_width, key_bytes);
    cache = rows > cols ? rows : cols;
  }
  fopru_select_kernel<S><<<static_cast<unsigned>(B), select_threads(N), cache, stream>>>(
      scores, sb, sn, N, keep, row_width, out_idx, cache);
  // Stream order makes the copy wait for the indices; every index is in [0, N).
  gather(x, sxb, sxn, sxd, B, N, D, out_idx, keep, 1, keep, out_x, sm_count, stream);
}

#define VTK_SCORE_TYPES(X) X(float) X(__half) X(__nv_bfloat16) X(double)

#define VTK_INSTANTIATE_TOPK(S)                                                                  \
  template void launch_topk_indices<S>(const S*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t*, \
                                       cudaStream_t);
VTK_SCORE_TYPES(VTK_INSTANTIATE_TOPK)

#define VTK_INSTANTIATE_GATHER(E)                                                                      \
  template void launch_gather_tokens<E>(const E*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                        const int64_t*, int64_t, int64_t, int64_t, E*, int, cudaStream_t);
VTK_INSTANTIATE_GATHER(uint16_t)
VTK_INSTANTIATE_GATHER(uint32_t)
VTK_INSTANTIATE_GATHER(uint64_t)

#define VTK_INSTANTIATE_FOPRU(S, E)                                                                     \
  template void launch_fopru_select<S, E>(const S*, int64_t, int64_t, const E*, int64_t, int64_t, int64_t, \
                                          int64_t, int64_t, int64_t, int64_t, int64_t, E*, int64_t*, int, \
                                          cudaStream_t);
#define VTK_INSTANTIATE_FOPRU_ALL_E(S) \
  VTK_INSTANTIATE_FOPRU(S, uint16_t) VTK_INSTANTIATE_FOPRU(S, uint32_t) VTK_INSTANTIATE_FOPRU(S, uint64_t)
VTK_SCORE_TYPES(VTK_INSTANTIATE_FOPRU_ALL_E)

}  // namespace gpu
}  // namespace vtk
