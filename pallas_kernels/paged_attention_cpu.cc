// Paged attention for CPU as an XLA FFI custom call (the `cpu` attention backend).
//
// Same contract as `paged_attention` in paged_attention_xla.py:
//   q            [S, Q, H, D]           f32 | bf16 | f16   (S query tiles of Q slots)
//   kv_pool      [L, NB, 2, bs, KV, D]  f32 | bf16 | f16 | f8e4m3fn | f8e5m2
//   layer        []                     s32
//   block_tables [S, W]                 s32
//   seq_lens     [S]                    s32   context length incl. this step's tokens, 0 = pad
//   q_positions  [S, Q]                 s32   absolute position of each query, -1 = pad
//   out          [S, Q, H, D]           q's dtype; padding queries give exactly 0
// A query at position p sees keys 0..min(p, seq_len - 1) of its own tile's block table.
//
// Work is split into (tile, kv head) items shared out over XLA's intra-op thread pool. An
// item walks its pages once: each page's K rows are converted to f32, scored against the
// item's G*Q query rows, folded into an online (flash) softmax, and its V rows accumulated,
// so every K/V byte of the context is read exactly once per step, straight from the pool.

#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxHeadDim = 256;
constexpr float kMaskValue = -1e30f;

inline float bf16_to_f32(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

using jpaged::f32_to_bf16;

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((bits >> 23) & 0xff) - 127 + 15;
  uint32_t man = bits & 0x7fffffu;
  if (((bits >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (man >> 13), rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}

// 256-entry tables for the float8 formats (built once).
struct Fp8Tables {
  float e4m3fn[256];
  float e5m2[256];
  Fp8Tables() {
    for (int i = 0; i < 256; ++i) {
      float sign = (i & 0x80) ? -1.0f : 1.0f;
      int e = (i >> 3) & 0xf, m = i & 0x7;
      if (e == 0xf && m == 0x7) {
        e4m3fn[i] = NAN;
      } else if (e == 0) {
        e4m3fn[i] = sign * std::ldexp(static_cast<float>(m) / 8.0f, -6);
      } else {
        e4m3fn[i] = sign * std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
      }
      e5m2[i] = f16_to_f32(static_cast<uint16_t>(i << 8));
    }
  }
};
const Fp8Tables kFp8;

// Converts `n` elements of `src` (of `dtype`) to f32.
inline void load_row(const void* src, ffi::DataType dtype, int n, float* dst) {
  switch (dtype) {
    case ffi::DataType::F32:
      std::memcpy(dst, src, sizeof(float) * n);
      return;
    case ffi::DataType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      int i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
#endif
#if defined(__AVX2__) && defined(__FMA__)
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        _mm256_storeu_ps(dst + i, jpaged::bf16_8_to_f32(h));
      }
#endif
      for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case ffi::DataType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case ffi::DataType::F8E4M3FN: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = kFp8.e4m3fn[s[i]];
      return;
    }
    case ffi::DataType::F8E5M2: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = kFp8.e5m2[s[i]];
      return;
    }
    default:
      return;
  }
}

inline void store_row(const float* src, ffi::DataType dtype, int n, void* dst) {
  switch (dtype) {
    case ffi::DataType::F32:
      std::memcpy(dst, src, sizeof(float) * n);
      return;
    case ffi::DataType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case ffi::DataType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    default:
      return;
  }
}

inline float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

struct Problem {
  const char* q;
  const char* pool;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* q_positions;
  char* out;
  ffi::DataType q_dtype, kv_dtype;
  size_t q_item, kv_item;  // bytes per element
  int64_t num_tiles, q_len, num_heads, head_dim, num_blocks, block_size, num_kv_heads, width;
  int64_t layer;
  float scale;
};


#if defined(__AVX512F__)
// 16 vectors -> one: lane t of the result is the sum of v[t]'s 16 lanes (three rounds of
// pairwise shuffles and adds; 45 instructions where 16 separate reductions take ~130).
inline __m512 sum16x16(const __m512* v) {
  __m512 x[8], u[4];
  for (int i = 0; i < 8; ++i) {
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: sums of v[4i .. 4i + 3] over that lane
    const __m512d y = _mm512_castps_pd(x[2 * i]), z = _mm512_castps_pd(x[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(y, z)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(y, z)));
  }
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 K / V values as f32: loaded, or (bf16 pool) widened exactly from 16 bf16.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The softmax half of one query row against 16 keys of a page, t0 .. t0 + 15: keys [0, nk)
// of those are in the page and [0, nv) visible to the row. Their scores (16 partial dot
// products reduced into one vector, so max, exp and sum are vector operations too) fold into
// the row's online softmax: acc [D] is rescaled where the maximum grows, row_max and denom
// updated, and the 16 keys' weights go to w (0 past nv). DV = D / 16 when it is a
// compile-time constant (D = 64, 128: q held in registers, the d loops unrolled), else 0 and D
// at run time; both give the same bits. qb (bf16 pools on AVX512-BF16, DV > 0): the row's
// unscaled bf16 query (D values), whose scores come from VDPBF16PS (exact products, f32 sums)
// times `scale`; q unused.
template <int DV, typename T = float>
inline void row_weights16(const float* q, const T* k_rows, int64_t row_stride, int64_t t0,
                          int64_t nk, int64_t nv, int64_t d_runtime, float* acc, float& row_max,
                          float& denom, const void* qb, float scale, float* w) {
  const int64_t nvec = DV > 0 ? DV : d_runtime / 16;
  __m512 qv[DV > 0 ? DV : 1];
  if constexpr (DV > 0) {
#pragma GCC unroll 16
    for (int i = 0; i < DV; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  }
  __m512 part[16];
#pragma GCC unroll 16
  for (int64_t t = 0; t < 16; ++t) {
    __m512 sum = _mm512_setzero_ps();
    if (t < nk) {
      const T* k = k_rows + (t0 + t) * row_stride;
#if defined(__AVX512BF16__)
      if constexpr (DV > 0 && std::is_same_v<T, uint16_t>) {
        if (qb != nullptr) {
          const auto* q16 = static_cast<const uint16_t*>(qb);
#pragma GCC unroll 8
          for (int i = 0; i < DV / 2; ++i) {
            const __m512i kv = _mm512_loadu_si512(k + 32 * i);
            const __m512i qv2 = _mm512_loadu_si512(q16 + 32 * i);
            sum = _mm512_dpbf16_ps(sum, reinterpret_cast<const __m512bh&>(qv2),
                                   reinterpret_cast<const __m512bh&>(kv));
          }
          part[t] = sum;
          continue;
        }
      }
#endif
      if constexpr (DV > 0) {
#pragma GCC unroll 16
        for (int i = 0; i < DV; ++i) sum = _mm512_fmadd_ps(qv[i], load16(k + 16 * i), sum);
      } else {
        for (int64_t i = 0; i < nvec; ++i) {
          sum = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * i), load16(k + 16 * i), sum);
        }
      }
    }
    part[t] = sum;
  }
  const __mmask16 vis = static_cast<__mmask16>((1u << nv) - 1u);
  __m512 dots = sum16x16(part);
  if (qb != nullptr) dots = _mm512_mul_ps(dots, _mm512_set1_ps(scale));
  const __m512 scores = _mm512_mask_mov_ps(_mm512_set1_ps(kMaskValue), vis, dots);
  const float new_max = std::max(row_max, _mm512_reduce_max_ps(scores));
  const __m512 e = _mm512_maskz_mov_ps(vis, jpaged::exp16(_mm512_sub_ps(scores, _mm512_set1_ps(new_max))));
  _mm512_storeu_ps(w, e);
  if (new_max > row_max) {  // rescale what acc and denom hold so far
    const float rescale = std::exp(row_max - new_max);
    const __m512 rs = _mm512_set1_ps(rescale);
    for (int64_t i = 0; i < nvec; ++i) {
      _mm512_storeu_ps(acc + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * i), rs));
    }
    denom *= rescale;
    row_max = new_max;
  }
  denom += _mm512_reduce_add_ps(e);
}

// One f32 query row (scaled) against one page's f32 keys [0, n), of which [0, visible) are
// visible to it, folded into its online softmax (acc [d], row_max, denom), 16 keys at a time:
// row_weights16, then the weighted V rows added into acc. For a head_dim d (a multiple of 16)
// known only at run time; D = 64 / 128 go through attend_rows16.
void attend_row16(const float* q, const float* k_rows, const float* v_rows, int64_t row_stride,
                  int64_t n, int64_t visible, int64_t d, float* acc, float& row_max,
                  float& denom) {
  alignas(64) float w[16];
  for (int64_t t0 = 0; t0 < visible; t0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n - t0);
    const int64_t nv = std::min<int64_t>(16, visible - t0);
    row_weights16<0>(q, k_rows, row_stride, t0, nk, nv, d, acc, row_max, denom, nullptr, 1.0f, w);
    for (int64_t i = 0; i < d / 16; ++i) {
      __m512 a = _mm512_loadu_ps(acc + 16 * i);
      for (int64_t t = 0; t < nv; ++t) {
        a = _mm512_fmadd_ps(_mm512_set1_ps(w[t]), load16(v_rows + (t0 + t) * row_stride + 16 * i),
                            a);
      }
      _mm512_storeu_ps(acc + 16 * i, a);
    }
  }
}

// A page's K and V rows (one kv head's) to fetch into L2 a row at a time while another page
// computes: a burst of a whole page's lines fills the core's miss buffers and stalls the loads
// behind it, so memory and compute did not overlap.
struct PagePrefetch {
  const char* k = nullptr;  // K row 0 of the page; null: nothing to fetch
  const char* v = nullptr;  // V row 0
  size_t stride = 0;        // bytes from one token's row to the next
  size_t row_bytes = 0;
  void row(int64_t t) const {
    if (k == nullptr) return;
    for (size_t b = 0; b < row_bytes; b += 64) {
      _mm_prefetch(k + t * stride + b, _MM_HINT_T1);
      _mm_prefetch(v + t * stride + b, _MM_HINT_T1);
    }
  }
};

// V rows t .. t + nv - 1 weighted into RG accumulator rows at once: each V row is loaded (and
// widened) once for the RG rows; acc_r += w_r[t] v_t key by key, and a weight of 0 (a key
// past the row's causal limit, a real finite row) adds +-0.
// pf: the rows t of a later page to fetch alongside (see PagePrefetch).
template <int DV, int RG, typename T>
inline void weighted_v_rows(const T* v_rows, int64_t row_stride, int64_t nv, const float* w,
                            float* acc, int64_t acc_stride, const PagePrefetch& pf) {
  __m512 a[RG][DV];
#pragma GCC unroll 16
  for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < DV; ++i) a[r][i] = _mm512_loadu_ps(acc + r * acc_stride + 16 * i);
  }
  for (int64_t t = 0; t < nv; ++t) {
    pf.row(t);
    const T* v = v_rows + t * row_stride;
    __m512 vt[DV];
#pragma GCC unroll 16
    for (int i = 0; i < DV; ++i) vt[i] = load16(v + 16 * i);
#pragma GCC unroll 16
    for (int r = 0; r < RG; ++r) {
      const __m512 wt = _mm512_set1_ps(w[r * 16 + t]);
#pragma GCC unroll 16
      for (int i = 0; i < DV; ++i) a[r][i] = _mm512_fmadd_ps(wt, vt[i], a[r][i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < DV; ++i) _mm512_storeu_ps(acc + r * acc_stride + 16 * i, a[r][i]);
  }
}

// Rows [0, rows) of an item against one page's keys [0, n) (D = 16 DV = 64 / 128): each row's
// softmax half (row_weights16), then the V rows once for up to kRowGroup rows at a time rather
// than once per row (decode: the G query heads of a kv head). A row gets the same bits
// whatever rows share its item (a verify step's drafts equal plain decoding).
// visible[r]: keys [0, visible[r]) of the page are visible to row r (<= n).
// pf: a later page (bs rows), fetched a row per key of this one's V loop.
template <int DV, typename T>
void attend_rows16(int64_t rows, const float* q, const uint16_t* qb, const T* k_rows,
                   const T* v_rows, int64_t row_stride, int64_t n, const int64_t* visible,
                   float* acc, float* row_max, float* denom, float scale, const PagePrefetch& pf,
                   int64_t bs) {
  int64_t fetched = 0;  // rows of pf fetched so far
  constexpr int kRowGroup = DV <= 4 ? 4 : 2;  // accumulators kRowGroup x DV zmm + DV of V
  constexpr int64_t D = 16 * DV;
  alignas(64) float w[kRowGroup * 16];
  int64_t last = 0;
  for (int64_t r = 0; r < rows; ++r) last = std::max(last, visible[r]);
  for (int64_t t0 = 0; t0 < last; t0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n - t0);
    for (int64_t g0 = 0; g0 < rows; g0 += kRowGroup) {
      const int64_t rg = std::min<int64_t>(kRowGroup, rows - g0);
      int64_t nv_max = 0;
      for (int64_t j = 0; j < rg; ++j) {
        const int64_t r = g0 + j;
        const int64_t nv = std::min<int64_t>(16, visible[r] - t0);
        if (nv <= 0) {
          std::fill(w + j * 16, w + j * 16 + 16, 0.0f);
          continue;
        }
        nv_max = std::max(nv_max, nv);
        row_weights16<DV, T>(q + r * D, k_rows, row_stride, t0, nk, nv, D, acc + r * D,
                             row_max[r], denom[r], qb == nullptr ? nullptr : qb + r * D, scale,
                             w + j * 16);
      }
      if (nv_max == 0) continue;
      const T* v = v_rows + t0 * row_stride;
      float* a = acc + g0 * D;
      PagePrefetch part;  // pf's rows from `fetched` on, in the first group's V loop only
      if (g0 == 0 && pf.k != nullptr && fetched < bs) {
        part = pf;
        part.k += fetched * pf.stride;
        part.v += fetched * pf.stride;
        fetched = std::min(bs, fetched + nv_max);
      }
      switch (rg) {
        case 1: weighted_v_rows<DV, 1>(v, row_stride, nv_max, w, a, D, part); break;
        case 2: weighted_v_rows<DV, 2>(v, row_stride, nv_max, w, a, D, part); break;
        case 3:
          if constexpr (kRowGroup >= 3) {
            weighted_v_rows<DV, 3>(v, row_stride, nv_max, w, a, D, part);
          }
          break;
        default:
          if constexpr (kRowGroup >= 4) {
            weighted_v_rows<DV, 4>(v, row_stride, nv_max, w, a, D, part);
          }
          break;
      }
    }
  }
  for (; fetched < bs; ++fetched) pf.row(fetched);  // what the V loops did not reach
}
#elif defined(__AVX2__) && defined(__FMA__)
#define JPAGED_ATTEND_AVX2 1
// 8 vectors -> one: lane t of the result is the sum of v[t]'s 8 lanes.
inline __m256 sum8x8(const __m256* v) {
  // hadd(hadd(v0, v1), hadd(v2, v3)) = v0..v3's low-half sums | their high-half sums
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// attend_row16 on AVX2 + FMA: keys 8 at a time. DV = D / 8 when it is a compile-time constant
// (D = 64, 128: q's vectors and the accumulator rows held in registers, the d loops unrolled),
// else 0 and D at run time. Both give the same bits: one FMA chain per score over d, and acc
// summed over the keys in order.
template <int DV>
void attend_row8(const float* q, const float* k_rows, const float* v_rows, int64_t row_stride,
                 int64_t n, int64_t visible, int64_t d_runtime, float* acc, float& row_max,
                 float& denom) {
  const int64_t nvec = DV > 0 ? DV : d_runtime / 8;
  alignas(32) float w[8];
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t t0 = 0; t0 < visible; t0 += 8) {
    const int64_t nk = std::min<int64_t>(8, n - t0);
    const int64_t nv = std::min<int64_t>(8, visible - t0);
    __m256 part[8];
#pragma GCC unroll 8
    for (int64_t t = 0; t < 8; ++t) {
      __m256 sum = _mm256_setzero_ps();
      if (t < nk) {
        const float* k = k_rows + (t0 + t) * row_stride;
#pragma GCC unroll 16
        for (int64_t i = 0; i < nvec; ++i) {
          sum = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), _mm256_loadu_ps(k + 8 * i), sum);
        }
      }
      part[t] = sum;
    }
    const __m256 vis = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nv)), lane));
    const __m256 scores = _mm256_blendv_ps(_mm256_set1_ps(kMaskValue), sum8x8(part), vis);
    const float new_max = std::max(row_max, jpaged::reduce_max8(scores));
    const __m256 e =
        _mm256_and_ps(vis, jpaged::exp8(_mm256_sub_ps(scores, _mm256_set1_ps(new_max))));
    _mm256_store_ps(w, e);
    if (new_max > row_max) {  // rescale what acc and denom hold so far
      const float rescale = std::exp(row_max - new_max);
      const __m256 rs = _mm256_set1_ps(rescale);
#pragma GCC unroll 16
      for (int64_t i = 0; i < nvec; ++i) {
        _mm256_storeu_ps(acc + 8 * i, _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * i), rs));
      }
      denom *= rescale;
      row_max = new_max;
    }
    denom += jpaged::reduce_add8(e);
    if constexpr (DV > 0) {
      __m256 a[DV];
#pragma GCC unroll 16
      for (int i = 0; i < DV; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
      for (int64_t t = 0; t < nv; ++t) {
        const __m256 wt = _mm256_broadcast_ss(w + t);
        const float* v = v_rows + (t0 + t) * row_stride;
#pragma GCC unroll 16
        for (int i = 0; i < DV; ++i) a[i] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(v + 8 * i), a[i]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < DV; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
    } else {
      for (int64_t i = 0; i < nvec; ++i) {
        __m256 a = _mm256_loadu_ps(acc + 8 * i);
        for (int64_t t = 0; t < nv; ++t) {
          a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + t),
                              _mm256_loadu_ps(v_rows + (t0 + t) * row_stride + 8 * i), a);
        }
        _mm256_storeu_ps(acc + 8 * i, a);
      }
    }
  }
}
#endif

constexpr int64_t kPagesAhead = 4;  // pages fetched into L2 ahead of the one in use (bursts)
// the same for the rows path, whose fetches are spread over the computing page (attention_ab.py,
// bf16, Zen 4: 2 ahead 18.1 ms, 3 18.5, 4 19.7, 6 21.1; bursts of 4 ahead 25.7)
constexpr int64_t kSpreadAhead = 2;

// The keys an item's queries can see: up to its last query position (and the context).
int64_t item_kv_end(const Problem& p, int64_t tile) {
  int64_t last = -1;
  for (int64_t qi = 0; qi < p.q_len; ++qi) {
    last = std::max<int64_t>(last, p.q_positions[tile * p.q_len + qi]);
  }
  const int64_t seq_len = p.seq_lens[tile];
  return std::min<int64_t>({last + 1, seq_len, p.width * p.block_size});
}

// One (tile, kv head) item: G * Q query rows against the tile's context. next_item: the item
// this worker takes next (-1: none), whose first pages the rows path fetches while it
// computes this one's last; head_fetched: this item's first pages were fetched that way.
// Returns whether it fetched all of next_item's first kSpreadAhead pages.
bool attend_item(const Problem& p, int64_t tile, int64_t kv_head, std::vector<float>& scratch,
                 int64_t next_item, bool head_fetched) {
  const int64_t D = p.head_dim, Q = p.q_len, G = p.num_heads / p.num_kv_heads;
  const int64_t rows = Q * G, bs = p.block_size;
  // scratch: queries [rows, D], acc [rows, D], max [rows], denom [rows], pos [rows],
  //          scores [rows, bs], k page [bs, D], v page [bs, D]
  scratch.resize(static_cast<size_t>(2 * rows * D + 3 * rows + rows * bs + 2 * bs * D));
  float* qf = scratch.data();
  float* acc = qf + rows * D;
  float* row_max = acc + rows * D;
  float* denom = row_max + rows;
  float* last_key = denom + rows;  // last visible key position of each row, as float
  float* scores = last_key + rows;
  float* kf = scores + rows * bs;
  float* vf = kf + bs * D;

  const int32_t seq_len = p.seq_lens[tile];
  int64_t max_visible = -1;  // last key position any row of this item sees
  for (int64_t qi = 0; qi < Q; ++qi) {
    const int32_t pos = p.q_positions[tile * Q + qi];
    const int64_t last = std::min<int64_t>(pos, static_cast<int64_t>(seq_len) - 1);
    max_visible = std::max(max_visible, last);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = qi * G + g, h = kv_head * G + g;
      const char* src = p.q + ((tile * Q + qi) * p.num_heads + h) * D * p.q_item;
      load_row(src, p.q_dtype, static_cast<int>(D), qf + r * D);
      for (int64_t d = 0; d < D; ++d) qf[r * D + d] *= p.scale;
      last_key[r] = static_cast<float>(last);
      row_max[r] = kMaskValue;
      denom[r] = 0.0f;
    }
  }
  std::fill(acc, acc + rows * D, 0.0f);

#if defined(JPAGED_ATTEND_AVX2)
  auto* const row8 = D == 64 ? attend_row8<8> : D == 128 ? attend_row8<16> : attend_row8<0>;
#endif
#if defined(__AVX512BF16__)
  // bf16 q over a bf16 pool: the unscaled queries as bf16 pairs for VDPBF16PS scores
  thread_local std::vector<uint16_t> qb;
  qb.clear();
  if (p.q_dtype == ffi::DataType::BF16 && p.kv_dtype == ffi::DataType::BF16 &&
      (D == 64 || D == 128)) {
    qb.resize(static_cast<size_t>(rows * D));
    for (int64_t qi = 0; qi < Q; ++qi) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = qi * G + g, h = kv_head * G + g;
        const char* src = p.q + ((tile * Q + qi) * p.num_heads + h) * D * p.q_item;
        std::memcpy(qb.data() + r * D, src, D * 2);
      }
    }
  }
#else
  const std::vector<int> qb;
#endif
  const int64_t num_pages = max_visible < 0 ? 0 : max_visible / bs + 1;
  const int32_t* table = p.block_tables + tile * p.width;
  thread_local std::vector<int64_t> visible;  // per row: keys of the page it sees
  visible.resize(static_cast<size_t>(rows));
  const uint16_t* qb_rows = nullptr;  // bf16 queries for VDPBF16PS scores, if any
#if defined(__AVX512BF16__)
  if (!qb.empty()) qb_rows = qb.data();
#endif
  const size_t token_stride = static_cast<size_t>(p.num_kv_heads * D) * p.kv_item;
  const size_t row_bytes = static_cast<size_t>(D) * p.kv_item;
  // The rows path (attend_rows16): AVX-512 and D = 64 / 128. Pages are scattered, so they are
  // fetched into L2 ahead of use: where the rows path reads them in place (f32, bf16), the page
  // kSpreadAhead ahead a row per key of its V loop, and the first page the ones before it in a
  // burst; otherwise the page kPagesAhead ahead in one burst (the first page: all up to it).
#if defined(__AVX512F__)
  const bool rows_path = D == 64 || D == 128;
#else
  const bool rows_path = false;
#endif
  const bool spread =
      rows_path && (p.kv_dtype == ffi::DataType::BF16 || p.kv_dtype == ffi::DataType::F32);
  const int64_t pages = std::min(num_pages, p.width);
  int64_t next_head_fetched = 0;  // of next_item's first kSpreadAhead pages
  for (int64_t page = 0; page < pages; ++page) {
    const int64_t block = table[page];
    const int64_t first = page * bs;
    const int64_t n = std::min<int64_t>(bs, max_visible + 1 - first);
    const char* k_base =
        p.pool + ((((p.layer * p.num_blocks + block) * 2 + 0) * bs) * p.num_kv_heads + kv_head) *
                     D * p.kv_item;
    const char* v_base = k_base + static_cast<size_t>(bs) * token_stride;
    const int64_t ahead_to = spread ? kSpreadAhead - 1 : kPagesAhead;
    const int64_t ahead_from = page > 0 ? ahead_to : spread && head_fetched ? ahead_to + 1 : 1;
    for (int64_t ahead = ahead_from; ahead <= ahead_to; ++ahead) {
      const int64_t np = page + ahead;
      if (np >= pages) break;
      const char* next = p.pool + ((((p.layer * p.num_blocks + table[np]) * 2 + 0) * bs) *
                                       p.num_kv_heads + kv_head) * D * p.kv_item;
      for (int64_t t = 0; t < bs; ++t) {
        for (size_t b = 0; b < row_bytes; b += 64) {
          _mm_prefetch(next + t * token_stride + b, _MM_HINT_T1);
          _mm_prefetch(next + (bs + t) * token_stride + b, _MM_HINT_T1);
        }
      }
    }
    // f32 pools are read in place, bf16 ones in the rows path widened as read; other dtypes
    // are converted into kf / vf first
    const bool direct = p.kv_dtype == ffi::DataType::F32;
    const bool widened = rows_path && p.kv_dtype == ffi::DataType::BF16;
    const int64_t pool_stride = static_cast<int64_t>(token_stride / p.kv_item);  // elements
    const int64_t row_stride = direct ? pool_stride : D;
    const float* k_rows = direct ? reinterpret_cast<const float*>(k_base) : kf;
    const float* v_rows = direct ? reinterpret_cast<const float*>(v_base) : vf;
    if (!direct && !widened) {
      for (int64_t t = 0; t < n; ++t) {
        load_row(k_base + t * token_stride, p.kv_dtype, static_cast<int>(D), kf + t * D);
        load_row(v_base + t * token_stride, p.kv_dtype, static_cast<int>(D), vf + t * D);
      }
    }
#if defined(__AVX512F__)
    if (rows_path) {
      for (int64_t r = 0; r < rows; ++r) {
        visible[r] = std::clamp<int64_t>(static_cast<int64_t>(last_key[r]) - first + 1, 0, n);
      }
      PagePrefetch pf;  // this item's page kSpreadAhead on, or past its end the next item's
      const int64_t target = page + kSpreadAhead;
      int64_t pf_block = -1, pf_head = kv_head;
      if (spread && target < pages) {
        pf_block = table[target];
      } else if (spread && next_item >= 0) {
        const int64_t next_tile = next_item / p.num_kv_heads;
        if (target - pages < (item_kv_end(p, next_tile) + bs - 1) / bs) {
          pf_block = p.block_tables[next_tile * p.width + target - pages];
          pf_head = next_item % p.num_kv_heads;
          ++next_head_fetched;
        }
      }
      if (pf_block >= 0) {
        pf.k = p.pool + ((((p.layer * p.num_blocks + pf_block) * 2 + 0) * bs) * p.num_kv_heads +
                         pf_head) * D * p.kv_item;
        pf.v = pf.k + static_cast<size_t>(bs) * token_stride;
        pf.stride = token_stride;
        pf.row_bytes = row_bytes;
      }
      if (widened) {
        const auto* k16 = reinterpret_cast<const uint16_t*>(k_base);
        const auto* v16 = reinterpret_cast<const uint16_t*>(v_base);
        auto* const group = D == 64 ? attend_rows16<4, uint16_t> : attend_rows16<8, uint16_t>;
        group(rows, qf, qb_rows, k16, v16, pool_stride, n, visible.data(), acc, row_max, denom,
              p.scale, pf, bs);
      } else {
        auto* const group = D == 64 ? attend_rows16<4, float> : attend_rows16<8, float>;
        group(rows, qf, nullptr, k_rows, v_rows, row_stride, n, visible.data(), acc, row_max,
              denom, 1.0f, pf, bs);
      }
      continue;
    }
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = std::min<int64_t>(n, static_cast<int64_t>(last_key[r]) - first + 1);
      if (visible <= 0) continue;
#if defined(__AVX512F__)
      if (D % 16 == 0) {
        attend_row16(qf + r * D, k_rows, v_rows, row_stride, n, visible, D, acc + r * D,
                     row_max[r], denom[r]);
        continue;
      }
#elif defined(JPAGED_ATTEND_AVX2)
      if (D % 8 == 0) {
        row8(qf + r * D, k_rows, v_rows, row_stride, n, visible, D, acc + r * D, row_max[r],
            denom[r]);
        continue;
      }
#endif
      float* s = scores + r * bs;
      float page_max = kMaskValue;
      for (int64_t t = 0; t < visible; ++t) {
        s[t] = dot(qf + r * D, k_rows + t * row_stride, static_cast<int>(D));
        page_max = std::max(page_max, s[t]);
      }
      const float new_max = std::max(row_max[r], page_max);
      const float rescale = std::exp(row_max[r] - new_max);
      float* a = acc + r * D;
      float sum = 0.0f;
      for (int64_t d = 0; d < D; ++d) a[d] *= rescale;
      for (int64_t t = 0; t < visible; ++t) {
        const float w = std::exp(s[t] - new_max);
        sum += w;
        const float* v = v_rows + t * row_stride;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
      }
      denom[r] = denom[r] * rescale + sum;
      row_max[r] = new_max;
    }
  }

  for (int64_t qi = 0; qi < Q; ++qi) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = qi * G + g, h = kv_head * G + g;
      float* a = acc + r * D;
      const float inv = denom[r] > 0.0f ? 1.0f / denom[r] : 0.0f;
      for (int64_t d = 0; d < D; ++d) a[d] = denom[r] > 0.0f ? a[d] * inv : 0.0f;
      char* dst = p.out + ((tile * Q + qi) * p.num_heads + h) * D * p.q_item;
      store_row(a, p.q_dtype, static_cast<int>(D), dst);
    }
  }
  return next_head_fetched == kSpreadAhead;
}

constexpr int64_t kKeys = 32;  // keys per block (AMX path)
constexpr int64_t kAhead = 2;  // blocks prefetched ahead

// Where the K / V rows of one (tile, kv head) item's keys are in a 16-bit pool.
struct KvRows {
  const uint16_t* base;  // this layer's pages, offset to the kv head
  const int32_t* table;
  int64_t bs, page_shift, token_stride, row_bytes, kv_end;  // page_shift = log2(bs), or -1

  KvRows(const Problem& p, int64_t tile, int64_t kv_head, int64_t end)
      : base(reinterpret_cast<const uint16_t*>(p.pool) +
             p.layer * p.num_blocks * 2 * p.block_size * p.num_kv_heads * p.head_dim +
             kv_head * p.head_dim),
        table(p.block_tables + tile * p.width),
        bs(p.block_size),
        page_shift((p.block_size & (p.block_size - 1)) == 0 ? __builtin_ctzll(p.block_size) : -1),
        token_stride(p.num_kv_heads * p.head_dim),
        row_bytes(p.head_dim * 2),
        kv_end(end) {}

  // K row of `key`; its V row is bs * token_stride further on
  const uint16_t* k(int64_t key) const {
    const int64_t page = page_shift >= 0 ? key >> page_shift : key / bs;
    const int64_t slot = page_shift >= 0 ? key & (bs - 1) : key % bs;
    return base + (table[page] * 2 * bs + slot) * token_stride;
  }

  // Into L2, the K and V rows of keys [first, first + kKeys) (pages are scattered, so the
  // hardware prefetchers do not see them coming).
  void prefetch(int64_t first) const {
    for (int64_t key = first; key < std::min(first + kKeys, kv_end); ++key) {
      const char* kr = reinterpret_cast<const char*>(k(key));
      const char* vr = kr + bs * token_stride * 2;
      for (int64_t b = 0; b < row_bytes; b += 64) {
        _mm_prefetch(kr + b, _MM_HINT_T1);
        _mm_prefetch(vr + b, _MM_HINT_T1);
      }
    }
  }
};


#if defined(JPAGED_HAVE_AMX)
// ---- bf16 queries over a bf16 pool on AMX tiles ----------------------------------------
//
// Per (tile, kv head) item, the G * Q query rows go in blocks of 16 and the context in blocks
// of 32 keys. Scores are computed transposed, S^T [keys, rows] = K Q^T, so 16 K rows load as
// one A tile (straight from the page when they are all inside it and the context). Each query
// row then gathers its 32 scores into two vectors for the online softmax, so a decode item
// (G = 3 rows) costs 3 rows of vector work per block rather than 32 keys of it. P [rows, keys]
// in bf16 is a plain A tile; V, interleaved by key pairs, is the B tile of P V, which
// accumulates into O through the tiles.
constexpr bool kHaveAmx = true;

using jpaged::amx_permitted;
using jpaged::configure_tiles;

void release_tiles() { _tile_release(); }

using jpaged::exp16;

struct AmxScratch {
  alignas(64) uint16_t qt[8][16][32];   // Q^T B tiles, one per 32 of D: [pair][row][2]
  alignas(64) uint16_t k[kKeys][kMaxHeadDim];
  alignas(64) uint16_t v[kMaxHeadDim / 16][16][32];  // V B tiles per 16 of D: [pair][d][2]
  alignas(64) float s[kKeys][16];       // S^T
  alignas(64) uint16_t p[16][kKeys];    // P A tile, bf16 [row][key]
  alignas(64) uint16_t p_lo[16][kKeys]; // P - bf16(P), the same way
  alignas(64) float o[16][kMaxHeadDim];
};

// Permutation / gather indices, built once.
struct AmxConstants {
  __m512i lo_words, hi_words;  // vpermt2w: interleave words 0..15 (lo) / 16..31 (hi) of 2 rows
  __m512i column;              // f32 offsets of one column of S^T (16 keys, 16 floats apart)
  __m512i iota;                // 0..15
  __m512i pair_words;          // vpermw: words i and 16 + i side by side (0, 16, 1, 17, ...)
};

const AmxConstants& amx_constants() {
  static const AmxConstants k = [] {
    alignas(64) uint16_t lo[32], hi[32];
    alignas(64) int32_t column[16], iota[16];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = i, lo[2 * i + 1] = 32 + i;
      hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
      column[i] = i * 16;
      iota[i] = i;
    }
    alignas(64) uint16_t pair[32];
    for (int i = 0; i < 16; ++i) pair[2 * i] = i, pair[2 * i + 1] = 16 + i;
    return AmxConstants{_mm512_load_si512(lo), _mm512_load_si512(hi), _mm512_load_si512(column),
                        _mm512_load_si512(iota), _mm512_load_si512(pair)};
  }();
  return k;
}

// The hi part of two vectors of probabilities as bf16 (words 0..15 = p0, 16..31 = p1), and
// what rounding left out, the same way. Both softmax paths split through this.
inline void split_bf16(__m512 p0, __m512 p1, __m512i& hi, __m512i& lo) {
  const __m512bh h = _mm512_cvtne2ps_pbh(p1, p0);
  hi = reinterpret_cast<const __m512i&>(h);
  const __m512 lo0 = _mm512_sub_ps(
      p0, _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_castsi512_si256(hi))));
  const __m512 lo1 = _mm512_sub_ps(
      p1, _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_extracti64x4_epi64(hi, 1))));
  const __m512bh l = _mm512_cvtne2ps_pbh(lo1, lo0);
  lo = reinterpret_cast<const __m512i&>(l);
}

// Rows of a row block from which the softmax runs on all 16 at once: 4-query tiles (12 rows)
// 68.4 vs 63.4 ms, 32-query tiles 82.1 vs 64.1 ms; with 3 rows (decode) the per-row loop is
// faster (35.4 vs 42.8 ms), with 6 even (attention_ab.py, 30 layers, same process).
constexpr int64_t kRowsVectorSoftmax = 8;

// Transposes a 16 x 16 matrix of 32-bit elements held as 16 vectors (rows), in place.
inline void transpose16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// The online softmax of one block of 32 keys for all 16 query rows at once, from S^T (one
// vector of 16 rows per key): what the per-row loop in attend_item_amx computes, operation for
// operation (the same max, exp16, the same pairwise sum order as _mm512_reduce_add_ps, the same
// bf16 splits), so a row's result does not depend on which path ran. For items of many rows
// (prefill chunks, verify steps): no gathers, and the work does not grow with the rows.
// last: each row's last visible key (-1 for rows past the item's); writes P and P_lo.
void softmax_rows16(AmxScratch& w, int64_t k0, const int32_t* last, float* row_max,
                    float* denom, int64_t D, __m512 scale, const AmxConstants& k) {
  const __m512i last_v = _mm512_loadu_si512(last);
  const __m512 mask_value = _mm512_set1_ps(kMaskValue);
  __m512 sv[kKeys];
  __mmask16 vis[kKeys];
  __m512 block_max = mask_value;
  for (int64_t j = 0; j < kKeys; ++j) {
    vis[j] = _mm512_cmp_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(k0 + j)), last_v,
                                   _MM_CMPINT_LE);
    sv[j] = _mm512_mask_mul_ps(mask_value, vis[j], _mm512_load_ps(w.s[j]), scale);
    block_max = _mm512_max_ps(block_max, sv[j]);
  }
  alignas(64) float new_max[16];
  const __m512 old_max = _mm512_loadu_ps(row_max);
  const __m512 nm = _mm512_max_ps(old_max, block_max);
  _mm512_store_ps(new_max, nm);
  for (__mmask16 grew = _mm512_cmp_ps_mask(nm, old_max, _CMP_GT_OQ); grew; grew &= grew - 1) {
    const int m = __builtin_ctz(grew);  // rescale what O and the denominator hold so far
    const float rescale = std::exp(row_max[m] - new_max[m]);
    const __m512 rs = _mm512_set1_ps(rescale);
    for (int64_t d = 0; d < D; d += 16) {
      _mm512_store_ps(&w.o[m][d], _mm512_mul_ps(_mm512_load_ps(&w.o[m][d]), rs));
    }
    denom[m] *= rescale;
    row_max[m] = new_max[m];
  }
  __m512i hi[16], lo[16];  // per key pair: dword m = (key 2i, key 2i + 1) of row m
  __m512 q[16];
  for (int64_t j = 0; j < kKeys; j += 2) {
    const __m512 p0 = _mm512_maskz_mov_ps(vis[j], exp16(_mm512_sub_ps(sv[j], nm)));
    const __m512 p1 = _mm512_maskz_mov_ps(vis[j + 1], exp16(_mm512_sub_ps(sv[j + 1], nm)));
    sv[j] = p0;
    sv[j + 1] = p1;
    __m512i hb, lb;  // words 0..15 = key j's rows, 16..31 = key j + 1's
    split_bf16(p0, p1, hb, lb);
    hi[j / 2] = _mm512_permutexvar_epi16(k.pair_words, hb);
    lo[j / 2] = _mm512_permutexvar_epi16(k.pair_words, lb);
  }
  // the row sums in _mm512_reduce_add_ps's order over (keys i, 16 + i): halves, quarters, ...
  for (int i = 0; i < 16; ++i) q[i] = _mm512_add_ps(sv[i], sv[16 + i]);
  for (int i = 0; i < 8; ++i) q[i] = _mm512_add_ps(q[8 + i], q[i]);
  for (int i = 0; i < 4; ++i) q[i] = _mm512_add_ps(q[4 + i], q[i]);
  const __m512 c0 = _mm512_add_ps(q[0], q[2]), c1 = _mm512_add_ps(q[1], q[3]);
  _mm512_storeu_ps(denom, _mm512_add_ps(_mm512_loadu_ps(denom), _mm512_add_ps(c0, c1)));
  transpose16_epi32(hi);
  transpose16_epi32(lo);
  for (int m = 0; m < 16; ++m) {
    _mm512_store_si512(w.p[m], hi[m]);
    _mm512_store_si512(w.p_lo[m], lo[m]);
  }
}

void attend_item_amx(const Problem& p, int64_t tile, int64_t kv_head, AmxScratch& w,
                     const KvRows* next) {
  const int64_t D = p.head_dim, Q = p.q_len, G = p.num_heads / p.num_kv_heads;
  const int64_t rows = Q * G, bs = p.block_size, chunks = D / 32;
  const int32_t seq_len = p.seq_lens[tile];
  const size_t token_stride = static_cast<size_t>(p.num_kv_heads * D);  // elements
  const uint16_t* qsrc = reinterpret_cast<const uint16_t*>(p.q);
  uint16_t* out = reinterpret_cast<uint16_t*>(p.out);
  const AmxConstants& k = amx_constants();
  const __m512 scale = _mm512_set1_ps(p.scale), mask_value = _mm512_set1_ps(kMaskValue);

  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    alignas(64) int32_t last[16];
    alignas(64) float row_max[16], denom[16];
    std::fill(last, last + 16, -1);  // rows past nr see nothing
    std::fill(row_max, row_max + 16, kMaskValue);
    std::fill(denom, denom + 16, 0.0f);
    int64_t max_visible = -1;
    std::memset(w.qt, 0, sizeof(w.qt));
    std::memset(w.p, 0, sizeof(w.p));  // rows past nr stay 0: their O rows stay 0
    std::memset(w.p_lo, 0, sizeof(w.p_lo));
    for (int64_t m = 0; m < nr; ++m) {
      const int64_t r = r0 + m, qi = r / G, h = kv_head * G + r % G;
      const int32_t pos = p.q_positions[tile * Q + qi];
      last[m] = static_cast<int32_t>(std::min<int64_t>(pos, static_cast<int64_t>(seq_len) - 1));
      max_visible = std::max<int64_t>(max_visible, last[m]);
      const uint16_t* qrow = qsrc + ((tile * Q + qi) * p.num_heads + h) * D;
      for (int64_t d = 0; d < D; ++d) w.qt[d / 32][(d % 32) / 2][m * 2 + d % 2] = qrow[d];
    }
    for (int64_t m = 0; m < 16; ++m) std::fill(w.o[m], w.o[m] + D, 0.0f);
    const int64_t kv_end = std::min<int64_t>(max_visible + 1, p.width * bs);

    const KvRows rows_of(p, tile, kv_head, kv_end);
    const bool last_row_block = r0 + 16 >= rows;
    int64_t next_prefetched = 0;  // blocks of the next item prefetched so far
    for (int64_t b = 0; b < kAhead; ++b) rows_of.prefetch(b * kKeys);
    for (int64_t k0 = 0; k0 < kv_end; k0 += kKeys) {
      if (k0 + kAhead * kKeys < kv_end) {
        rows_of.prefetch(k0 + kAhead * kKeys);
      } else if (last_row_block && next != nullptr && next_prefetched < kAhead) {
        next->prefetch(kKeys * next_prefetched++);  // the next item's first blocks
      }
      // K: a group of 16 keys inside the context and inside one page is a tile straight from
      // the pool (rows token_stride apart); others are staged with zeros past the context.
      // V key pairs are always staged, interleaved (pool slots past the context may be garbage).
      const uint16_t* direct[2] = {nullptr, nullptr};
      for (int h = 0; h < 2; ++h) {
        const int64_t g0 = k0 + 16 * h;
        if (bs % 16 == 0 && g0 + 15 < kv_end) direct[h] = rows_of.k(g0);
      }
      for (int64_t j = 0; j < kKeys; ++j) {
        const int64_t key = k0 + j;
        if (direct[j / 16] != nullptr) continue;
        if (key < kv_end) {
          std::memcpy(w.k[j], rows_of.k(key), D * 2);
        } else {
          std::memset(w.k[j], 0, D * 2);
        }
      }
      // This block's V rows into L1 now (they were asked into L2 two blocks ago), so their
      // loads below overlap S^T and the softmax: measured faster than either prefetch alone.
      for (int64_t key = k0; key < std::min(k0 + kKeys, kv_end); ++key) {
        const char* vr = reinterpret_cast<const char*>(rows_of.k(key) + bs * token_stride);
        for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(vr + b, _MM_HINT_T0);
      }
      // S^T = K Q^T, keys 0..15 in tmm0, 16..31 in tmm1
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(4, w.qt[c], 64);
        if (direct[0]) {
          _tile_loadd(2, direct[0] + 32 * c, token_stride * 2);
        } else {
          _tile_loadd(2, &w.k[0][32 * c], kMaxHeadDim * 2);
        }
        if (direct[1]) {
          _tile_loadd(3, direct[1] + 32 * c, token_stride * 2);
        } else {
          _tile_loadd(3, &w.k[16][32 * c], kMaxHeadDim * 2);
        }
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 3, 4);
      }
      _tile_stored(0, w.s[0], 64);
      _tile_stored(1, w.s[16], 64);
      // online softmax: all 16 rows at once for many rows, else one row (32 scores in two
      // vectors) at a time; both give the same bits
      const __m512i keys0 = _mm512_add_epi32(k.iota, _mm512_set1_epi32(static_cast<int32_t>(k0)));
      const __m512i keys1 = _mm512_add_epi32(keys0, _mm512_set1_epi32(16));
      if (nr >= kRowsVectorSoftmax) softmax_rows16(w, k0, last, row_max, denom, D, scale, k);
      for (int64_t m = 0; m < nr && nr < kRowsVectorSoftmax; ++m) {
        const __m512i last_m = _mm512_set1_epi32(last[m]);
        const __mmask16 vis0 = _mm512_cmple_epi32_mask(keys0, last_m);
        const __mmask16 vis1 = _mm512_cmple_epi32_mask(keys1, last_m);
        if ((vis0 | vis1) == 0) {  // nothing visible to this row here: P row 0, O unchanged
          std::memset(w.p[m], 0, sizeof(w.p[m]));
          std::memset(w.p_lo[m], 0, sizeof(w.p_lo[m]));
          continue;
        }
        const __m512 s0 = _mm512_mask_mul_ps(
            mask_value, vis0, _mm512_i32gather_ps(k.column, &w.s[0][m], 4), scale);
        const __m512 s1 = _mm512_mask_mul_ps(
            mask_value, vis1, _mm512_i32gather_ps(k.column, &w.s[16][m], 4), scale);
        const float new_max = std::max(row_max[m], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
        const __m512 nm = _mm512_set1_ps(new_max);
        const __m512 p0 = _mm512_maskz_mov_ps(vis0, exp16(_mm512_sub_ps(s0, nm)));
        const __m512 p1 = _mm512_maskz_mov_ps(vis1, exp16(_mm512_sub_ps(s1, nm)));
        if (new_max > row_max[m]) {  // rescale what O and the denominator hold so far
          const float rescale = std::exp(row_max[m] - new_max);
          const __m512 rs = _mm512_set1_ps(rescale);
          for (int64_t d = 0; d < D; d += 16) {
            _mm512_store_ps(&w.o[m][d], _mm512_mul_ps(_mm512_load_ps(&w.o[m][d]), rs));
          }
          denom[m] *= rescale;
          row_max[m] = new_max;
        }
        denom[m] += _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
        // P = hi + lo, both bf16: P V then loses nothing to P's rounding (~2^-17 relative)
        __m512i hi, lo;
        split_bf16(p0, p1, hi, lo);
        _mm512_store_si512(w.p[m], hi);
        _mm512_store_si512(w.p_lo[m], lo);
      }
      for (int64_t j = 0; j < kKeys; j += 2) {
        const uint16_t* rows2[2] = {nullptr, nullptr};
        for (int i = 0; i < 2; ++i) {
          if (k0 + j + i < kv_end) rows2[i] = rows_of.k(k0 + j + i) + bs * token_stride;  // V row
        }
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512i a = rows2[0] ? _mm512_loadu_si512(rows2[0] + 32 * c) : _mm512_setzero_si512();
          const __m512i b = rows2[1] ? _mm512_loadu_si512(rows2[1] + 32 * c) : _mm512_setzero_si512();
          _mm512_store_si512(w.v[2 * c][j / 2], _mm512_permutex2var_epi16(a, k.lo_words, b));
          _mm512_store_si512(w.v[2 * c + 1][j / 2], _mm512_permutex2var_epi16(a, k.hi_words, b));
        }
      }
      // O += P V through the tiles, 16 of D at a time
      _tile_loadd(5, w.p, 64);
      _tile_loadd(4, w.p_lo, 64);
      for (int64_t e = 0; e < D / 16; ++e) {
        _tile_loadd(6, &w.o[0][16 * e], kMaxHeadDim * 4);
        _tile_loadd(7, w.v[e], 64);
        _tile_dpbf16ps(6, 5, 7);
        _tile_dpbf16ps(6, 4, 7);
        _tile_stored(6, &w.o[0][16 * e], kMaxHeadDim * 4);
      }
    }
    for (int64_t m = 0; m < nr; ++m) {
      const int64_t r = r0 + m, qi = r / G, h = kv_head * G + r % G;
      const float inv = denom[m] > 0.0f ? 1.0f / denom[m] : 0.0f;
      uint16_t* dst = out + ((tile * Q + qi) * p.num_heads + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = f32_to_bf16(denom[m] > 0.0f ? w.o[m][d] * inv : 0.0f);
    }
  }
}
#else
constexpr bool kHaveAmx = false;
struct AmxScratch {};
bool amx_permitted() { return false; }
void configure_tiles() {}
void release_tiles() {}
void attend_item_amx(const Problem&, int64_t, int64_t, AmxScratch&, const KvRows*) {}
#endif

bool supported_q(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

bool supported_kv(ffi::DataType t) {
  return supported_q(t) || t == ffi::DataType::F8E4M3FN || t == ffi::DataType::F8E5M2;
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool thread_pool, ffi::AnyBuffer q,
                              ffi::AnyBuffer kv_pool, ffi::Buffer<ffi::S32> layer,
                              ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> seq_lens,
                              ffi::Buffer<ffi::S32> q_positions, float scale,
                              ffi::Result<ffi::AnyBuffer> out) {
  auto qd = q.dimensions();
  auto pd = kv_pool.dimensions();
  if (qd.size() != 4 || pd.size() != 6 || pd[2] != 2 || qd[3] != pd[5] || qd[3] > kMaxHeadDim ||
      pd[4] == 0 || qd[2] % pd[4] != 0) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: bad q / kv_pool shapes");
  }
  if (!supported_q(q.element_type()) || !supported_kv(kv_pool.element_type()) ||
      out->element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: unsupported dtype");
  }
  Problem p;
  p.q = static_cast<const char*>(q.untyped_data());
  p.pool = static_cast<const char*>(kv_pool.untyped_data());
  p.block_tables = block_tables.typed_data();
  p.seq_lens = seq_lens.typed_data();
  p.q_positions = q_positions.typed_data();
  p.out = static_cast<char*>(out->untyped_data());
  p.q_dtype = q.element_type();
  p.kv_dtype = kv_pool.element_type();
  p.q_item = ffi::ByteWidth(p.q_dtype);
  p.kv_item = ffi::ByteWidth(p.kv_dtype);
  p.num_tiles = qd[0];
  p.q_len = qd[1];
  p.num_heads = qd[2];
  p.head_dim = qd[3];
  p.num_blocks = pd[1];
  p.block_size = pd[3];
  p.num_kv_heads = pd[4];
  p.width = block_tables.dimensions()[1];
  p.layer = layer.typed_data()[0];
  p.scale = scale;
  if (p.layer < 0 || p.layer >= pd[0]) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: layer out of range");
  }

  const int64_t num_items = p.num_tiles * p.num_kv_heads;
  const bool amx = kHaveAmx && p.q_dtype == ffi::DataType::BF16 &&
                   p.kv_dtype == ffi::DataType::BF16 && p.head_dim % 32 == 0 && amx_permitted();
  std::atomic<int64_t> next{0};
  jpaged::run_workers(thread_pool, num_items, [&p, &next, num_items, amx](int64_t) {
    thread_local std::vector<float> scratch;  // reused across calls by each pool thread
    thread_local std::unique_ptr<AmxScratch> tiles;
    if (amx) {
      if (!tiles) tiles = std::make_unique<AmxScratch>();
      configure_tiles();
    }
    // Each worker claims its next item before it starts the current one, so the AMX path can
    // prefetch that item's first keys while it finishes this one.
    bool head_fetched = false;  // by the item before, in this worker
    for (int64_t i = next.fetch_add(1); i < num_items;) {
      const int64_t j = next.fetch_add(1);
      const int64_t tile = i / p.num_kv_heads, kv_head = i % p.num_kv_heads;
      if (amx) {
        std::optional<KvRows> ahead;
        if (j < num_items) {
          const int64_t t = j / p.num_kv_heads;
          ahead.emplace(p, t, j % p.num_kv_heads, item_kv_end(p, t));
        }
        attend_item_amx(p, tile, kv_head, *tiles, ahead ? &*ahead : nullptr);
      } else {
        head_fetched = attend_item(p, tile, kv_head, scratch, j < num_items ? j : -1, head_fetched);
      }
      i = j;
    }
    if (amx) release_tiles();
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // kv_pool
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()   // seq_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_positions
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>());        // out

// A result XLA allocates and nothing writes: the KV pool at start-up, so its 4 GiB are not
// zeroed page by page (a slot is always written before a context covers it; the kernel never
// reads a slot past a context).
// The pool's pages are first touched as the engine writes K/V, during serving; asking for
// transparent huge pages makes that one fault (and one 2 MiB clear) per 512 pages, not a
// fault per 4 KiB page (where THP is `madvise`; elsewhere a no-op). JPAGED_POOL_THP=0 skips it.
static ffi::Error UninitializedImpl(ffi::Result<ffi::AnyBuffer> pool) {
  const char* env = std::getenv("JPAGED_POOL_THP");
  if (env != nullptr && env[0] == '0') return ffi::Error::Success();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(pool->untyped_data());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + pool->size_bytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedUninitialized, UninitializedImpl,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());

// Faults in the pages of [p, p + n) for writing without changing a byte, so the engine's
// first K/V writes into them do not pay the page faults (and, in a VM, the host backing the
// memory). Each 4 KiB page gets one locked add of 0: atomic against the engine's own
// stores, so it may run on the pool while steps write it. The pool's prefault thread
// (jpaged/pool_prefault.py) calls it a few MiB at a time.
extern "C" void jpaged_prefault(void* p, size_t n) {
  constexpr uintptr_t kPage = 4096;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  uintptr_t addr = (reinterpret_cast<uintptr_t>(p) + 7) & ~uintptr_t{7};
  while (addr + 8 <= end) {
    asm volatile("lock addq $0, %0" : "+m"(*reinterpret_cast<uint64_t*>(addr)) : : "memory");
    addr = (addr & ~(kPage - 1)) + kPage;
  }
}
