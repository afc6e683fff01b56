// The `cpu` linear backend (see linear_cpu.py): y = x @ W for one layer of a stacked weight
// packed once at load, as XLA FFI custom calls. Each call takes the whole [L, ...] array and a
// layer index, so no weight slice is copied, and the number of leading rows of x to compute:
// a step padded to a bucketed shape computes only its real tokens, and the padding rows of y
// are 0.
//
// JpagedLinearF32: f32 on FMA. W is packed as [L, N / 32, K, 32] panels; a micro kernel keeps
// up to 14 rows x 32 columns of y in registers (AVX-512; AVX2: 6 x 16) and streams its panel.
//
// JpagedLinearAmx: bf16 on Intel AMX tiles (on CPUs without AMX, the same tiles on AVX2 FMA:
// linear_avx2.h).
//
// y[M, N] = x[M, K] @ W[K, N]; W [L, NB, KB, 16, 32] is packed into AMX "B" tiles: tile (nb, kb) holds rows k = 32 kb .. 32 kb + 31 and
// columns n = 16 nb .. 16 nb + 15 as 16 rows of (k pair, 16 n x 2 k) bf16, the VNNI order that
// TDPBF16PS reads. Products accumulate in f32 tiles; the result is written as bf16 (round to
// nearest even) or f32.
//
// Work items are 32-column panels of W. Each item keeps its panel hot while it walks x in
// chunks of 32 rows (two A tiles x two B tiles -> four f32 accumulator tiles). Items are
// shared over XLA's intra-op thread pool; every worker configures its own tiles.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kGroupRows = 256;  // rows of x per L2-resident group (see panels)

#if !defined(JPAGED_HAVE_AMX) && defined(__AVX2__) && defined(__FMA__)
#define JPAGED_BF16_AVX2 1  // the bf16 kernels on FMA instead (linear_avx2.h)
#endif

#if defined(JPAGED_HAVE_AMX) || defined(JPAGED_BF16_AVX2)
constexpr int64_t kTileRows = 16;   // rows of x per A tile
constexpr int64_t kTileK = 32;      // bf16 values of K per tile row
constexpr int64_t kTileN = 16;      // columns per B tile
constexpr int64_t kTileElems = 512; // bf16 values in one packed B tile

struct Problem {
  const uint16_t* x;  // [mp / 16, kb, 16, 32] bf16 A tiles, zero padded
  const float* xf = nullptr;  // AVX2: x widened to f32, [m, 32 kb] zero padded
  const uint16_t* w;  // this layer's [nb, kb, 16, 32]
  int64_t m, mp, kb, n, nb;
  bool out_f32;
  bool swiglu;  // W's B tiles alternate gate / up columns: out = silu(gate) * up, [m, n = F]
  void* out;  // [m, n]
  // Greedy ids instead of y (JpagedLinearAmxArgmax): this worker's best value, its column
  // (INT32_MAX: none yet) and a NaN flag per row, over the panels it computed.
  float* best = nullptr;
  int32_t* best_id = nullptr;
  uint8_t* has_nan = nullptr;
};
#endif

#if defined(JPAGED_BF16_AVX2) && defined(__AVX512BF16__) && defined(__AVX512F__)
#define JPAGED_BF16_DPBF16 1  // AVX512-BF16 without AMX: VDPBF16PS (linear_avx2.h)
#endif

#if defined(JPAGED_HAVE_AMX) || defined(JPAGED_BF16_DPBF16)
// The bf16 epilogues, 16 columns at a time (the AVX2-only build has 8-wide ones in
// linear_avx2.h): c holds `rows` rows x 32 columns of f32 results (row stride 32).
inline __m512 silu16(__m512 g);
inline __m512 bf16_bits_to_f32(__m256i h);
inline __m256i to_bf16(__m512 v);

// Folds a block's f32 results into the worker's per-row first maximum. Columns reach a row in
// increasing order within a worker, so a later equal value never replaces the held one.
void argmax_rows(const Problem& p, const float* c, int64_t m0, int64_t rows, int64_t n0) {
  const int64_t cols = std::min<int64_t>(2 * kTileN, p.n - n0);
  const __mmask16 m_lo = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m_hi =
      cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = m0 + r;
    const float* src = c + r * 2 * kTileN;
    const __m512 a = _mm512_mask_loadu_ps(ninf, m_lo, src);
    const __m512 b = _mm512_mask_loadu_ps(ninf, m_hi, src + kTileN);
    if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q)) {
      p.has_nan[row] = 1;
      continue;
    }
    const __m512 held = _mm512_set1_ps(p.best[row]);
    const bool first = p.best_id[row] == std::numeric_limits<int32_t>::max();
    const bool any = first ? (_mm512_cmp_ps_mask(a, held, _CMP_GE_OQ) |
                              _mm512_cmp_ps_mask(b, held, _CMP_GE_OQ)) != 0
                           : (_mm512_cmp_ps_mask(a, held, _CMP_GT_OQ) |
                              _mm512_cmp_ps_mask(b, held, _CMP_GT_OQ)) != 0;
    if (!any) continue;
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
    const __m512 tv = _mm512_set1_ps(top);
    const __mmask16 in_a = _mm512_cmp_ps_mask(a, tv, _CMP_EQ_OQ);
    const int64_t j = in_a ? __builtin_ctz(in_a) : 16 + __builtin_ctz(_mm512_cmp_ps_mask(b, tv, _CMP_EQ_OQ));
    p.best[row] = top;
    p.best_id[row] = static_cast<int32_t>(n0 + j);
  }
}

// SwiGLU's epilogue: the block's two tiles hold gate and up for the same 16 columns of y.
// Rounds as the unfused path does (gate|up written as bf16 by the same instruction, then
// silu_mul's roundings: silu to bf16, then the product).
void write_swiglu_rows(const Problem& p, const float* c, int64_t m0, int64_t rows, int64_t n0) {
  const int64_t cols = std::min<int64_t>(kTileN, p.n - n0);
  const __mmask16 m = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = c + r * 2 * kTileN;
    __m512bh gh = _mm512_cvtne2ps_pbh(_mm512_load_ps(src + kTileN), _mm512_load_ps(src));
    const __m512i both = reinterpret_cast<__m512i&>(gh);  // gate in the low 16, up in the high
    const __m512 g = bf16_bits_to_f32(_mm512_castsi512_si256(both));
    const __m512 u = bf16_bits_to_f32(_mm512_extracti64x4_epi64(both, 1));
    const __m512 sg = bf16_bits_to_f32(to_bf16(silu16(g)));
    uint16_t* dst = static_cast<uint16_t*>(p.out) + (m0 + r) * p.n + n0;
    _mm256_mask_storeu_epi16(dst, m, to_bf16(_mm512_mul_ps(sg, u)));
  }
}

void write_rows(const Problem& p, const float* c, int64_t m0, int64_t rows, int64_t n0) {
  const int64_t cols = std::min<int64_t>(2 * kTileN, p.n - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = c + r * 2 * kTileN;
    if (p.out_f32) {
      std::memcpy(static_cast<float*>(p.out) + (m0 + r) * p.n + n0, src, cols * sizeof(float));
    } else {
      uint16_t* dst = static_cast<uint16_t*>(p.out) + (m0 + r) * p.n + n0;
      if (cols == 2 * kTileN) {  // round to nearest even, 32 at a time
        __m512bh v = _mm512_cvtne2ps_pbh(_mm512_load_ps(src + kTileN), _mm512_load_ps(src));
        _mm512_storeu_si512(dst, reinterpret_cast<__m512i&>(v));
      } else {
        for (int64_t j = 0; j < cols; ++j) dst[j] = jpaged::f32_to_bf16(src[j]);
      }
    }
  }
}

#endif

#include "linear_avx2.h"

#if defined(JPAGED_HAVE_AMX)
using jpaged::amx_permitted;
using jpaged::configure_tiles;

// Stores the accumulator tiles 0 / 1 (and 2 / 3 when `two`) into c, 32 rows x 32 columns
// (row stride 32); returns how many of those rows are y's (m0 onwards).
int64_t store_tiles(const Problem& p, float* c, int64_t m0, bool two) {
  _tile_stored(0, c, 2 * kTileN * sizeof(float));
  _tile_stored(1, c + kTileN, 2 * kTileN * sizeof(float));
  if (two) {
    _tile_stored(2, c + kTileRows * 2 * kTileN, 2 * kTileN * sizeof(float));
    _tile_stored(3, c + kTileRows * 2 * kTileN + kTileN, 2 * kTileN * sizeof(float));
  }
  return std::min<int64_t>(two ? 2 * kTileRows : kTileRows, p.m - m0);
}

// Tile loads stall on memory without this: fetch both B streams kPrefetch tiles ahead (past
// the panel's end, that is the next panel of the same worker).
constexpr int64_t kPrefetch = 4;

inline void prefetch_ahead(const uint16_t* b0, const uint16_t* b1, int64_t k) {
  const char* p0 = reinterpret_cast<const char*>(b0 + (k + kPrefetch) * kTileElems);
  const char* p1 = reinterpret_cast<const char*>(b1 + (k + kPrefetch) * kTileElems);
  for (int line = 0; line < 16; ++line) {
    _mm_prefetch(p0 + 64 * line, _MM_HINT_T0);
    _mm_prefetch(p1 + 64 * line, _MM_HINT_T0);
  }
}

// Rows m0 .. m0 + 31 (or + 15 where only 16 remain) x columns 32 item .. 32 item + 31 of y.
// `stream`: the panel comes from memory, so prefetch it ahead.
void block(const Problem& p, int64_t item, int64_t m0, bool stream) {
  alignas(64) float c[2 * kTileRows * 2 * kTileN];
  const uint16_t* b0 = p.w + (2 * item) * p.kb * kTileElems;
  const uint16_t* b1 = b0 + p.kb * kTileElems;
  const uint16_t* a0 = p.x + m0 * p.kb * kTileK;  // tile (m0 / 16, k) at a0 + k * 512
  const uint16_t* a1 = a0 + p.kb * kTileElems;
  const bool two = m0 + kTileRows < p.mp;
  _tile_zero(0);
  _tile_zero(1);
  if (two) {
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < p.kb; ++k) {
      if (stream) prefetch_ahead(b0, b1, k);
      _tile_loadd(6, b0 + k * kTileElems, 64);
      _tile_loadd(7, b1 + k * kTileElems, 64);
      _tile_loadd(4, a0 + k * kTileElems, 64);
      _tile_loadd(5, a1 + k * kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else {
    for (int64_t k = 0; k < p.kb; ++k) {
      if (stream) prefetch_ahead(b0, b1, k);
      _tile_loadd(6, b0 + k * kTileElems, 64);
      _tile_loadd(7, b1 + k * kTileElems, 64);
      _tile_loadd(4, a0 + k * kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    }
  }
  const int64_t rows = store_tiles(p, c, m0, two);
  if (p.best != nullptr) {
    argmax_rows(p, c, m0, rows, 2 * kTileN * item);
  } else if (p.swiglu) {
    write_swiglu_rows(p, c, m0, rows, kTileN * item);
  } else {
    write_rows(p, c, m0, rows, 2 * kTileN * item);
  }
}

// Panels [begin, end) for every row. Rows go in groups of kGroupRows (x's group stays in
// L2); within a group each panel is streamed from memory once and reused from L1/L2 by the
// group's 32-row chunks. Decode-sized x is a single group. Block: block or block_x6, each
// with its own group size.
template <void (*Block)(const Problem&, int64_t, int64_t, bool)>
void panel_groups(const Problem& p, int64_t begin, int64_t end, int64_t group_rows) {
  for (int64_t g0 = 0; g0 < p.mp; g0 += group_rows) {
    const int64_t g1 = std::min(p.mp, g0 + group_rows);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t m0 = g0; m0 < g1; m0 += 2 * kTileRows) Block(p, i, m0, m0 == g0);
    }
  }
}

void panels(const Problem& p, int64_t begin, int64_t end) {
  panel_groups<block>(p, begin, end, kGroupRows);
}

// ---- f32 as bf16 x 6 on AMX ---------------------------------------------------------------
//
// An f32 value splits exactly enough into three bf16 terms, v = v0 + v1 + v2 (v0 = bf16(v),
// v1 = bf16(v - v0), v2 = bf16(v - v0 - v1): 3 x 8 significand bits), so x @ W is the sum of
// the nine products xi @ Wj. The six with i + j <= 2 are kept (the others are below 2^-24 of
// |x||w|, f32's own rounding) and summed in the same f32 accumulator tiles, largest first, as
// XLA's BF16_BF16_F32_X6 dot algorithm (TPUs' f32 matmuls) does: near-f32 results at 6 AMX
// products each, against one FMA lane each on AVX-512. W holds the three planes of each B
// tile together, [L, NB, KB, 3, 16, 32]; x is split into A tiles the same way.

constexpr int64_t kGroupRowsX6 = 128;  // x's group is 3x larger: 128 rows stay in L2

// Rows m0 .. m0 + 31 (or + 15) x columns 32 item .. 32 item + 31 of y, f32 out.
void block_x6(const Problem& p, int64_t item, int64_t m0, bool stream) {
  alignas(64) float c[2 * kTileRows * 2 * kTileN];
  constexpr int64_t kStep = 3 * kTileElems;  // one k step: three planes of one tile
  const uint16_t* b0 = p.w + (2 * item) * p.kb * kStep;
  const uint16_t* b1 = b0 + p.kb * kStep;
  const uint16_t* a0 = p.x + m0 * p.kb * 3 * kTileK;
  const uint16_t* a1 = a0 + p.kb * kStep;
  const bool two = m0 + kTileRows < p.mp;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < p.kb; ++k) {
    if (stream && k + 1 < p.kb) {
      const char* n0 = reinterpret_cast<const char*>(b0 + (k + 1) * kStep);
      const char* n1 = reinterpret_cast<const char*>(b1 + (k + 1) * kStep);
      for (int line = 0; line < 48; ++line) {
        _mm_prefetch(n0 + 64 * line, _MM_HINT_T0);
        _mm_prefetch(n1 + 64 * line, _MM_HINT_T0);
      }
    }
    for (int j = 0; j < 3; ++j) {  // W's plane j with x's planes 0 .. 2 - j
      _tile_loadd(6, b0 + k * kStep + j * kTileElems, 64);
      _tile_loadd(7, b1 + k * kStep + j * kTileElems, 64);
      for (int i = 0; i + j < 3; ++i) {
        _tile_loadd(4, a0 + k * kStep + i * kTileElems, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, a1 + k * kStep + i * kTileElems, 64);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
  }
  const int64_t rows = store_tiles(p, c, m0, two);
  write_rows(p, c, m0, rows, 2 * kTileN * item);
}

void panels_x6(const Problem& p, int64_t begin, int64_t end) {
  panel_groups<block_x6>(p, begin, end, kGroupRowsX6);
}


#endif  // AMX

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define JPAGED_HAVE_F32_FMA 1
// ---- f32 on FMA: AVX-512 (14 rows x 32 columns a block) or AVX2 (6 rows x 16 columns) ----

constexpr int64_t kPanelF32 = 32;  // columns per packed f32 panel (two zmm, four ymm)
#if defined(__AVX512F__)
constexpr int64_t kMaxRowsF32 = 14;  // 28 accumulators + 2 panel registers of 32
#else
constexpr int64_t kMaxRowsF32 = 6;  // 12 accumulators + 2 half-panel registers + 1 broadcast
#endif

struct ProblemF32 {
  const float* x;  // [m, k]
  const float* w;  // this layer's [np, k, 32]
  int64_t m, k, n, np;
  float* out;  // [m, n]
};

// Rows m0 .. m0 + MR - 1 x panel `j`.
// pf: where to prefetch 32 bytes per k into L2 (part of the next panel), or null.
#if defined(__AVX512F__)
template <int MR>
void micro_f32(const ProblemF32& p, int64_t m0, int64_t j, const char* pf) {
  __m512 acc[MR][2];  // fully unrolled loops keep these in registers
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const float* b = p.w + j * p.k * kPanelF32;
  const float* a = p.x + m0 * p.k;
  for (int64_t k = 0; k < p.k; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kPanelF32);
    const __m512 b1 = _mm512_loadu_ps(b + k * kPanelF32 + 16);
    if (pf != nullptr) _mm_prefetch(pf + 32 * k, _MM_HINT_T1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * p.k + k]);
      acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
    }
  }
  const int64_t n0 = j * kPanelF32, cols = std::min<int64_t>(kPanelF32, p.n - n0);
  const __mmask16 m_lo = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m_hi =
      cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* dst = p.out + (m0 + r) * p.n + n0;
    _mm512_mask_storeu_ps(dst, m_lo, acc[r][0]);
    _mm512_mask_storeu_ps(dst + 16, m_hi, acc[r][1]);
  }
}
#else
// AVX2 has 16 ymm registers: each half of the panel (16 columns, one 64-byte line per k) in
// its own pass over K.
template <int MR>
void micro_f32(const ProblemF32& p, int64_t m0, int64_t j, const char* pf) {
  const int64_t n0 = j * kPanelF32, cols = std::min<int64_t>(kPanelF32, p.n - n0);
  const float* a = p.x + m0 * p.k;
  for (int64_t half = 0; half < 2 && 16 * half < cols; ++half) {
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* b = p.w + j * p.k * kPanelF32 + 16 * half;
    for (int64_t k = 0; k < p.k; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * kPanelF32);
      const __m256 b1 = _mm256_loadu_ps(b + k * kPanelF32 + 8);
      if (pf != nullptr && half == 0) _mm_prefetch(pf + 32 * k, _MM_HINT_T1);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 ar = _mm256_broadcast_ss(a + r * p.k + k);
        acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
      }
    }
    const int64_t c = std::min<int64_t>(16, cols - 16 * half);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(c)), lane);
    const __m256i m_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(c) - 8), lane);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* dst = p.out + (m0 + r) * p.n + n0 + 16 * half;
      _mm256_maskstore_ps(dst, m_lo, acc[r][0]);
      _mm256_maskstore_ps(dst + 8, m_hi, acc[r][1]);
    }
  }
}
#endif

void rows_f32(const ProblemF32& p, int64_t m0, int64_t rows, int64_t j, const char* pf) {
  switch (rows) {
#define JPAGED_ROWS(R) \
  case R:              \
    return micro_f32<R>(p, m0, j, pf);
    JPAGED_ROWS(1) JPAGED_ROWS(2) JPAGED_ROWS(3) JPAGED_ROWS(4) JPAGED_ROWS(5) JPAGED_ROWS(6)
#if defined(__AVX512F__)
    JPAGED_ROWS(7) JPAGED_ROWS(8) JPAGED_ROWS(9) JPAGED_ROWS(10) JPAGED_ROWS(11)
    JPAGED_ROWS(12) JPAGED_ROWS(13) JPAGED_ROWS(14)
#endif
#undef JPAGED_ROWS
    default:
      return;
  }
}

// Panels [begin, end) for every row: rows in groups of kGroupRows (x's group stays in L2), each
// panel streamed from memory once per group and reused from L2 by its strips. While
// the later strips compute from L2, they prefetch the next panel (a share each), so its
// first strip does not wait on memory.
// Row groups [first_group, last_group) only.
void panels_f32(const ProblemF32& p, int64_t begin, int64_t end, int64_t first_group,
                int64_t last_group) {
  const int64_t panel_bytes = p.k * kPanelF32 * sizeof(float);
  const int64_t rows_end = std::min(p.m, last_group * kGroupRows);
  for (int64_t g0 = first_group * kGroupRows; g0 < rows_end; g0 += kGroupRows) {
    const int64_t g1 = std::min(p.m, g0 + kGroupRows);
    const int64_t strips = (g1 - g0 + kMaxRowsF32 - 1) / kMaxRowsF32;
    for (int64_t j = begin; j < end; ++j) {
      const char* next = reinterpret_cast<const char*>(p.w) + (j + 1) * panel_bytes;
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t m0 = g0 + s * kMaxRowsF32;
        const char* pf = nullptr;
        if (s > 0 && j + 1 < end) pf = next + (s - 1) * panel_bytes / (strips - 1);
        rows_f32(p, m0, std::min(kMaxRowsF32, g1 - m0), j, pf);
      }
    }
  }
}

#endif  // JPAGED_HAVE_F32_FMA

// Runs fn(begin, end) over num_items panels on XLA's intra-op pool, in runs of contiguous
// panels (one memory stream each, prefetched ahead) that the workers claim as they go: a pool
// thread wakes tens of microseconds after the call starts, and with one fixed half each the
// caller then waited for it (M = 64: 26.7 vs 20.4 ms for 30 layers, same process).
// max_run: the longest run a worker claims at once.
template <typename Fn>
void parallel_panels(ffi::ThreadPool& thread_pool, int64_t num_items, Fn fn,
                     int64_t max_run = INT64_MAX) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(thread_pool.num_threads(), num_items));
  const int64_t run = std::clamp<int64_t>(num_items / (4 * workers), 1, max_run);
  std::atomic<int64_t> next{0};
  jpaged::run_workers(thread_pool, workers, [&](int64_t) {
    for (int64_t b = next.fetch_add(run); b < num_items; b = next.fetch_add(run)) {
      fn(b, std::min(num_items, b + run));
    }
  });
}

// fn(begin, end, first_group, last_group) over num_items panels for `groups` row groups. One
// group: parallel_panels. More (prefill sizes): (group, panel) units, group by group, claimed
// in runs of at most a quarter of a group's panels; runs of panels for every group made the
// last runs long (ms) and one core waited for the other at the end of each call.
template <typename Fn>
void parallel_group_panels(ffi::ThreadPool& thread_pool, int64_t num_items, int64_t groups,
                           Fn fn) {
  if (groups <= 1) {
    parallel_panels(thread_pool, num_items, [&fn](int64_t b, int64_t e) { fn(b, e, 0, 1); });
    return;
  }
  parallel_panels(
      thread_pool, groups * num_items,
      [&fn, num_items](int64_t b, int64_t e) {
        for (int64_t u = b; u < e;) {
          const int64_t g = u / num_items, stop = std::min(e, (g + 1) * num_items);
          fn(u - g * num_items, stop - g * num_items, g, g + 1);
          u = stop;
        }
      },
      std::max<int64_t>(1, num_items / 4));
}

// The rows to compute, rows[0] clamped to [0, m]; zeroes y's rows from there to m.
int64_t live_rows(const ffi::Buffer<ffi::S32>& rows, int64_t m, int64_t n, size_t item, void* out) {
  const int64_t live = std::clamp<int64_t>(rows.typed_data()[0], 0, m);
  std::memset(static_cast<char*>(out) + live * n * item, 0, (m - live) * n * item);
  return live;
}

ffi::Error LinearF32Impl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> rows, ffi::Result<ffi::Buffer<ffi::F32>> out) {
#if defined(JPAGED_HAVE_F32_FMA)
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || od.size() != 2 || wd[3] != kPanelF32 ||
      wd[2] != xd[1] || od[0] != xd[0] || od[1] > wd[1] * kPanelF32 ||
      od[1] <= (wd[1] - 1) * kPanelF32) {
    return ffi::Error::InvalidArgument("linear_f32: bad x / w / out shapes");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("linear_f32: layer out of range");
  ProblemF32 p;
  p.x = x.typed_data();
  p.k = xd[1];
  p.n = od[1];
  p.np = wd[1];
  p.w = w.typed_data() + l * p.np * p.k * kPanelF32;
  p.out = out->typed_data();
  p.m = live_rows(rows, xd[0], p.n, sizeof(float), p.out);
  if (p.m > 0) {
    parallel_group_panels(thread_pool, p.np, (p.m + kGroupRows - 1) / kGroupRows,
                          [&p](int64_t b, int64_t e, int64_t g0, int64_t g1) {
                            panels_f32(p, b, e, g0, g1);
                          });
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("linear_f32: built for a CPU without AVX-512 or AVX2 + FMA");
#endif
}

#if defined(JPAGED_HAVE_AMX)
// Packs x's first p.m rows into this thread's A tiles and points p.x at them: x in A-tile
// order, [mp / 16, kb, 16, 32] zero padded, so every tile load is 1 KB contiguous
// (row-strided tile loads from L2 stall on line fills). Only the padding is zeroed: rows past
// m, and each row's K tail (the buffer is reused by this thread's later calls, so it holds
// old rows).
void pack_x(ffi::ThreadPool& thread_pool, const ffi::AnyBuffer& x, Problem& p) {
  const int64_t k = x.dimensions()[1];
  thread_local std::vector<uint16_t> tiles;
  tiles.resize(std::max<size_t>(tiles.size(), p.mp * p.kb * kTileK));
  const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
  uint16_t* packed_x = tiles.data();
  auto pack_rows = [&p, src, k, packed_x](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* row = packed_x + (r / kTileRows) * p.kb * kTileElems + (r % kTileRows) * kTileK;
      for (int64_t c = 0; c < p.kb * kTileK; c += kTileK) {
        const int64_t n = r < p.m ? std::clamp<int64_t>(k - c, 0, kTileK) : 0;
        uint16_t* dst = row + (c / kTileK) * kTileElems;
        if (n > 0) std::memcpy(dst, src + r * k + c, n * 2);
        if (n < kTileK) std::memset(dst + n, 0, (kTileK - n) * 2);
      }
    }
  };
  if (p.mp >= kGroupRows) {  // prefill-sized x: both cores pack (serial it was ~5 % of prefill)
    parallel_panels(thread_pool, p.mp / kTileRows, [&pack_rows](int64_t b, int64_t e) {
      pack_rows(b * kTileRows, e * kTileRows);
    });
  } else {
    pack_rows(0, p.mp);
  }
  p.x = packed_x;
}
#endif

template <bool kSwiglu>
ffi::Error LinearAmxImpl(ffi::ThreadPool thread_pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                         ffi::Result<ffi::AnyBuffer> out) {
#if defined(JPAGED_HAVE_AMX) || defined(JPAGED_BF16_AVX2)
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::BF16 ||
      (out->element_type() != ffi::DataType::BF16 && out->element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("linear_amx: x and w must be bf16, out bf16 or f32");
  }
  const int64_t out_cols = kSwiglu ? 2 * od[1] : od[1];  // W's columns: gate and up for each
  if (xd.size() != 2 || wd.size() != 5 || od.size() != 2 || wd[3] != 16 || wd[4] != 32 ||
      wd[1] % 2 != 0 || od[0] != xd[0] || (xd[1] + kTileK - 1) / kTileK != wd[2] ||
      out_cols > wd[1] * kTileN || out_cols <= (wd[1] - 2) * kTileN ||
      (kSwiglu && (od[1] % kTileN != 0 || out->element_type() != ffi::DataType::BF16))) {
    return ffi::Error::InvalidArgument("linear_amx: bad x / w / out shapes");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("linear_amx: layer out of range");
#if defined(JPAGED_HAVE_AMX)
  if (!amx_permitted()) return ffi::Error::Internal("linear_amx: the kernel refused AMX state");
#endif

  Problem p;
  p.kb = wd[2];
  p.n = od[1];
  p.nb = wd[1];
  p.w = static_cast<const uint16_t*>(w.untyped_data()) + l * p.nb * p.kb * kTileElems;
  p.out_f32 = out->element_type() == ffi::DataType::F32;
  p.swiglu = kSwiglu;
  p.out = out->untyped_data();
  p.m = live_rows(rows, xd[0], p.n, p.out_f32 ? 4 : 2, p.out);
  p.mp = (p.m + kTileRows - 1) / kTileRows * kTileRows;
  if (p.m == 0) return ffi::Error::Success();
#if defined(JPAGED_HAVE_AMX)
  pack_x(thread_pool, x, p);
  parallel_panels(thread_pool, p.nb / 2, [&p](int64_t begin, int64_t end) {
    configure_tiles();  // tile configuration is per thread
    panels(p, begin, end);
    _tile_release();
  });
#else
  widen_x(static_cast<const uint16_t*>(x.untyped_data()), xd[1], p);
  parallel_group_panels(thread_pool, p.nb / 2, (p.m + kGroupAvx2 - 1) / kGroupAvx2,
                        [&p](int64_t b, int64_t e, int64_t g0, int64_t g1) { panels(p, b, e, g0, g1); });
#endif
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("linear_amx: built for a CPU without AMX-BF16 or AVX2 + FMA");
#endif
}

#if defined(JPAGED_HAVE_AMX)
// Splits x's first p.m rows into this thread's A tiles, [mp / 16, kb, 3, 16, 32] bf16: plane
// i of tile (r / 16, c / 32) holds x_i (see block_x6) of rows r, columns c .. c + 31; the
// padding is 0. Points p.x at them.
void split_x(ffi::ThreadPool& thread_pool, const float* src, int64_t k, Problem& p) {
  thread_local std::vector<uint16_t> tiles;
  tiles.resize(std::max<size_t>(tiles.size(), p.mp * p.kb * 3 * kTileK));
  uint16_t* packed_x = tiles.data();
  auto split_rows = [&p, src, k, packed_x](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* row = packed_x + (r / kTileRows) * p.kb * 3 * kTileElems + (r % kTileRows) * kTileK;
      for (int64_t c = 0; c < p.kb * kTileK; c += kTileK) {
        const int64_t n = r < p.m ? std::clamp<int64_t>(k - c, 0, kTileK) : 0;
        const __mmask16 lo = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
        const __mmask16 hi = n >= 32 ? 0xffff : n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1);
        __m512 v[2] = {_mm512_maskz_loadu_ps(lo, src + r * k + c),
                       _mm512_maskz_loadu_ps(hi, src + r * k + c + 16)};
        uint16_t* dst = row + (c / kTileK) * 3 * kTileElems;
        for (int plane = 0; plane < 3; ++plane) {
          for (int h = 0; h < 2; ++h) {
            const __m256i b = to_bf16(v[h]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + plane * kTileElems + 16 * h), b);
            v[h] = _mm512_sub_ps(v[h], bf16_bits_to_f32(b));  // exact: the remainder
          }
        }
      }
    }
  };
  if (p.mp >= kGroupRowsX6) {
    parallel_panels(thread_pool, p.mp / kTileRows, [&split_rows](int64_t b, int64_t e) {
      split_rows(b * kTileRows, e * kTileRows);
    });
  } else {
    split_rows(0, p.mp);
  }
  p.x = packed_x;
}
#endif

// f32 x [M, K] @ W split into bf16 planes [L, NB, KB, 3, 16, 32] -> f32 [M, N] (block_x6).
ffi::Error LinearF32AmxImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x,
                            ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                            ffi::Buffer<ffi::S32> rows, ffi::Result<ffi::Buffer<ffi::F32>> out) {
#if defined(JPAGED_HAVE_AMX)
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (w.element_type() != ffi::DataType::BF16 || xd.size() != 2 || wd.size() != 6 ||
      wd[3] != 3 || wd[4] != 16 || wd[5] != 32 || wd[1] % 2 != 0 || od.size() != 2 ||
      od[0] != xd[0] || (xd[1] + kTileK - 1) / kTileK != wd[2] || od[1] > wd[1] * kTileN ||
      od[1] <= (wd[1] - 2) * kTileN) {
    return ffi::Error::InvalidArgument("linear_f32_amx: bad x / w / out shapes");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("linear_f32_amx: layer out of range");
  if (!amx_permitted()) return ffi::Error::Internal("linear_f32_amx: the kernel refused AMX state");
  Problem p;
  p.kb = wd[2];
  p.n = od[1];
  p.nb = wd[1];
  p.w = static_cast<const uint16_t*>(w.untyped_data()) + l * p.nb * p.kb * 3 * kTileElems;
  p.out_f32 = true;
  p.swiglu = false;
  p.out = out->typed_data();
  p.m = live_rows(rows, xd[0], p.n, sizeof(float), p.out);
  p.mp = (p.m + kTileRows - 1) / kTileRows * kTileRows;
  if (p.m == 0) return ffi::Error::Success();
  split_x(thread_pool, x.typed_data(), xd[1], p);
  parallel_panels(thread_pool, p.nb / 2, [&p](int64_t begin, int64_t end) {
    configure_tiles();
    panels_x6(p, begin, end);
    _tile_release();
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("linear_f32_amx: built for a CPU without AMX-BF16");
#endif
}

// Greedy ids of x @ W: the first argmax of each row's f32 logits (V for a row with NaN),
// computed as JpagedLinearAmx computes them but never written out. Each worker keeps its
// rows' best over the panels it took; the workers' bests are merged (ties: the lower column).
ffi::Error LinearAmxArgmaxImpl(ffi::ThreadPool thread_pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                               ffi::Buffer<ffi::S32> rows, int64_t n,
                               ffi::Result<ffi::Buffer<ffi::S32>> ids) {
#if defined(JPAGED_HAVE_AMX) || defined(JPAGED_BF16_AVX2)
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::BF16 ||
      xd.size() != 2 || wd.size() != 5 || wd[0] != 1 || wd[3] != 16 || wd[4] != 32 ||
      wd[1] % 2 != 0 || (xd[1] + kTileK - 1) / kTileK != wd[2] || n > wd[1] * kTileN ||
      n <= (wd[1] - 2) * kTileN || ids->dimensions().size() != 1 ||
      ids->dimensions()[0] != xd[0]) {
    return ffi::Error::InvalidArgument("linear_amx_argmax: bad x / w / ids shapes");
  }
#if defined(JPAGED_HAVE_AMX)
  if (!amx_permitted()) return ffi::Error::Internal("linear_amx: the kernel refused AMX state");
#endif
  int32_t* out = ids->typed_data();
  const int64_t m = std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  std::fill(out + m, out + xd[0], 0);
  if (m == 0) return ffi::Error::Success();
  Problem p;
  p.kb = wd[2];
  p.n = n;
  p.nb = wd[1];
  p.w = static_cast<const uint16_t*>(w.untyped_data());
  p.out_f32 = true;
  p.swiglu = false;
  p.out = nullptr;
  p.m = m;
  p.mp = (m + kTileRows - 1) / kTileRows * kTileRows;
#if defined(JPAGED_HAVE_AMX)
  pack_x(thread_pool, x, p);
#else
  widen_x(static_cast<const uint16_t*>(x.untyped_data()), xd[1], p);
#endif
  const int64_t items = p.nb / 2;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(thread_pool.num_threads(), items));
  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  std::vector<float> best(workers * m, -std::numeric_limits<float>::infinity());
  std::vector<int32_t> best_id(workers * m, kNone);
  std::vector<uint8_t> has_nan(workers * m, 0);
  const int64_t run = std::max<int64_t>(1, items / (4 * workers));
  std::atomic<int64_t> next{0};
  jpaged::run_workers(thread_pool, workers, [&](int64_t wk) {
    Problem q = p;
    q.best = best.data() + wk * m;
    q.best_id = best_id.data() + wk * m;
    q.has_nan = has_nan.data() + wk * m;
#if defined(JPAGED_HAVE_AMX)
    configure_tiles();
#endif
    for (int64_t b = next.fetch_add(run); b < items; b = next.fetch_add(run)) {
      panels(q, b, std::min(items, b + run));
    }
#if defined(JPAGED_HAVE_AMX)
    _tile_release();
#endif
  });
  for (int64_t r = 0; r < m; ++r) {
    float bv = -std::numeric_limits<float>::infinity();
    int32_t bi = kNone;
    bool nan = false;
    for (int64_t wk = 0; wk < workers; ++wk) {
      const int64_t i = wk * m + r;
      nan |= has_nan[i] != 0;
      if (best_id[i] == kNone) continue;
      if (best[i] > bv || (best[i] == bv && best_id[i] < bi)) bv = best[i], bi = best_id[i];
    }
    out[r] = nan || bi == kNone ? static_cast<int32_t>(n) : bi;
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("linear_amx_argmax: built for a CPU without AMX-BF16 or AVX2 + FMA");
#endif
}

// ---- SwiGLU's silu(gate) * up ------------------------------------------------------------
//
// XLA:CPU runs jax.nn.silu(gate) * up in bf16 at ~5 ns an element (0.32 ms a layer at 64
// rows, 5.2 ms at 2048; this kernel 0.073 and 2.0 ms); this is one AVX-512 pass.
// sigmoid(g) = 1 / (1 + e^-g) from e = e^-|g| (exp16's range), so no overflow. bf16 rounds
// where torch's bf16 SwiGLU does: silu(g) to bf16, then the product to bf16.

#if defined(__AVX512F__)
inline __m512 silu16(__m512 g) {
  const __m512 abs = _mm512_abs_ps(g);
  const __m512 e = jpaged::exp16(_mm512_sub_ps(_mm512_setzero_ps(), abs));  // e^-|g| in (0, 1]
  const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 sig = _mm512_mask_mul_ps(r, neg, r, e);  // g < 0: e / (1 + e)
  return _mm512_mul_ps(g, sig);
}

inline __m512 bf16_bits_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return bf16_bits_to_f32(_mm256_maskz_loadu_epi16(m, p));
}

// Rounds 16 floats to bf16 (nearest even; NaN stays NaN), as jpaged::f32_to_bf16 does.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, bits, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

template <typename T>
void silu_mul_row(const T* gu, int64_t f, T* out) {
  for (int64_t j = 0; j < f; j += 16) {
    const __mmask16 m = f - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (f - j)) - 1);
    if constexpr (std::is_same_v<T, float>) {
      const __m512 g = _mm512_maskz_loadu_ps(m, gu + j);
      const __m512 u = _mm512_maskz_loadu_ps(m, gu + f + j);
      _mm512_mask_storeu_ps(out + j, m, _mm512_mul_ps(silu16(g), u));
    } else {
      const __m512 g = load_bf16(gu + j, m);
      const __m512 u = load_bf16(gu + f + j, m);
      const __m512 s = bf16_bits_to_f32(to_bf16(silu16(g)));  // silu(g) rounded to bf16
      _mm256_mask_storeu_epi16(out + j, m, to_bf16(_mm512_mul_ps(s, u)));
    }
  }
}
#endif  // __AVX512F__

// gate_up [M, 2F] (gate in the first F columns, up in the last) -> out [M, F].
ffi::Error SiluMulImpl(ffi::ThreadPool thread_pool, ffi::AnyBuffer gate_up,
                       ffi::Result<ffi::AnyBuffer> out) {
#if defined(__AVX512F__) || defined(JPAGED_SILU_MUL_AVX2)
  auto gd = gate_up.dimensions();
  auto od = out->dimensions();
  const auto dtype = gate_up.element_type();
  if (gd.size() != 2 || od.size() != 2 || od[0] != gd[0] || gd[1] != 2 * od[1] ||
      out->element_type() != dtype ||
      (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("silu_mul: gate_up must be [M, 2F] f32 or bf16, out [M, F]");
  }
  const int64_t m = gd[0], f = od[1];
  constexpr int64_t kMinRows = 8;  // below this a second worker costs more than it saves
  const int64_t workers = std::max<int64_t>(1, m / kMinRows);
  const int64_t num = std::min<int64_t>(workers, thread_pool.num_threads());
  jpaged::run_workers(thread_pool, num, [&](int64_t w) {
    for (int64_t r = m * w / num; r < m * (w + 1) / num; ++r) {
      if (dtype == ffi::DataType::F32) {
        silu_mul_row(gate_up.typed_data<float>() + r * 2 * f, f, out->typed_data<float>() + r * f);
      } else {
        const auto* src = static_cast<const uint16_t*>(gate_up.untyped_data());
        silu_mul_row(src + r * 2 * f, f, static_cast<uint16_t*>(out->untyped_data()) + r * f);
      }
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("silu_mul: built for a CPU without AVX-512 or AVX2 + FMA");
#endif
}

// ---- RoPE on the fused q|k|v projection (bf16) ---------------------------------------------
//
// qkv [T, (H + 2 KV) E] -> q [T, H, E], k [T, KV, E] rotated (rotate-half, as HF Llama), and
// v [T, KV, E] copied out. cos, sin [T, E] f32. Rounds where torch's bf16 RoPE does: cos and
// sin to bf16, then x cos, rotate_half(x) sin and their sum each to bf16. XLA:CPU ran this at
// ~3 ns an element in bf16.
#if defined(__AVX512F__)
void rope_row(const uint16_t* x, const float* cos, const float* sin, int64_t heads, int64_t e,
              uint16_t* out) {
  const int64_t half = e / 2;
  for (int64_t j = 0; j < half; j += 16) {
    // cos and sin repeat over the halves, but round each half's own values (they need not)
    const __m512 c0 = bf16_bits_to_f32(to_bf16(_mm512_loadu_ps(cos + j)));
    const __m512 s0 = bf16_bits_to_f32(to_bf16(_mm512_loadu_ps(sin + j)));
    const __m512 c1 = bf16_bits_to_f32(to_bf16(_mm512_loadu_ps(cos + half + j)));
    const __m512 s1 = bf16_bits_to_f32(to_bf16(_mm512_loadu_ps(sin + half + j)));
    for (int64_t h = 0; h < heads; ++h) {
      const uint16_t* xh = x + h * e;
      const __m512 lo = load_bf16(xh + j, 0xffff);
      const __m512 hi = load_bf16(xh + half + j, 0xffff);
      const __m512 a0 = bf16_bits_to_f32(to_bf16(_mm512_mul_ps(lo, c0)));
      const __m512 b0 = bf16_bits_to_f32(to_bf16(_mm512_mul_ps(hi, s0)));  // rotated: -hi
      const __m512 a1 = bf16_bits_to_f32(to_bf16(_mm512_mul_ps(hi, c1)));
      const __m512 b1 = bf16_bits_to_f32(to_bf16(_mm512_mul_ps(lo, s1)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * e + j),
                          to_bf16(_mm512_sub_ps(a0, b0)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * e + half + j),
                          to_bf16(_mm512_add_ps(a1, b1)));
    }
  }
}
#endif  // __AVX512F__

ffi::Error RopeQkvImpl(ffi::ThreadPool thread_pool, ffi::AnyBuffer qkv, ffi::Buffer<ffi::F32> cos,
                       ffi::Buffer<ffi::F32> sin, ffi::Result<ffi::AnyBuffer> q,
                       ffi::Result<ffi::AnyBuffer> k, ffi::Result<ffi::AnyBuffer> v) {
#if defined(__AVX512F__)
  auto xd = qkv.dimensions();
  auto cd = cos.dimensions();
  auto qd = q->dimensions();
  auto kd = k->dimensions();
  bool ok = xd.size() == 2 && cd.size() == 2 && qd.size() == 3 && kd.size() == 3 &&
            sin.dimensions().size() == 2 && v->dimensions().size() == 3;
  const int64_t t = ok ? xd[0] : 0, e = ok ? cd[1] : 0;
  const int64_t heads = ok ? qd[1] : 0, kv_heads = ok ? kd[1] : 0;
  ok = ok && qkv.element_type() == ffi::DataType::BF16 && e % 32 == 0 && cd[0] == t &&
       sin.dimensions()[0] == t && sin.dimensions()[1] == e && qd[0] == t && qd[2] == e &&
       kd[0] == t && kd[2] == e && v->dimensions()[0] == t && v->dimensions()[1] == kv_heads &&
       v->dimensions()[2] == e && xd[1] == (heads + 2 * kv_heads) * e;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "rope_qkv: qkv [T, (H + 2 KV) E] bf16, cos / sin [T, E] f32 (E % 32 == 0), q [T, H, E], "
        "k / v [T, KV, E]");
  }
  const auto* x = static_cast<const uint16_t*>(qkv.untyped_data());
  auto* qo = static_cast<uint16_t*>(q->untyped_data());
  auto* ko = static_cast<uint16_t*>(k->untyped_data());
  auto* vo = static_cast<uint16_t*>(v->untyped_data());
  const int64_t width = xd[1];
  constexpr int64_t kMinRows = 16;
  const int64_t num = std::min<int64_t>(std::max<int64_t>(1, t / kMinRows), thread_pool.num_threads());
  jpaged::run_workers(thread_pool, num, [&](int64_t w) {
    for (int64_t r = t * w / num; r < t * (w + 1) / num; ++r) {
      const uint16_t* row = x + r * width;
      const float* c = cos.typed_data() + r * e;
      const float* s = sin.typed_data() + r * e;
      rope_row(row, c, s, heads, e, qo + r * heads * e);
      rope_row(row + heads * e, c, s, kv_heads, e, ko + r * kv_heads * e);
      std::memcpy(vo + r * kv_heads * e, row + (heads + kv_heads) * e, kv_heads * e * 2);
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("rope_qkv: built for a CPU without AVX-512");
#endif
}


// ---- greedy ids of an f32 head, screened on AMX -----------------------------------------
//
// A greedy step needs only the first argmax of each row's logits z = x @ W. `scores` holds
// s = bf16(x) @ bf16(W) with f32 sums (the AMX linear); |z_v - s_v| <= B_v, where
//   B_v = c |x| |w_v|,  c = (2^-8 + 2^-17 + 3 K 2^-24) x 1.25
// (rounding x and w_v to bf16 moves each product by at most 2^-8 + 2^-18 of |x_i w_vi|, and
// both the AMX and the f32 FMA chain round their K sums by at most K 2^-24 and 2 K 2^-24 of
// sum |x_i w_vi| <= |x| |w_v|; 1.25 covers the f32 norms). With T = max_v (s_v - B_v) <=
// max z, every v with s_v + B_v < T has z_v < max z, so the first argmax is among the others.
// Their panels are recomputed exactly with the f32 kernel's own FMA chain, so the id is the
// one JpagedLinearF32's logits give, bit for bit. Rows whose x or scores are not finite get
// every panel exact (NaN: id V, as JpagedRowArgmax gives).
#if defined(__AVX512F__)
void head_argmax_row(const ProblemF32& p, const float* s, const float* norms, float* exact,
                     int32_t* out) {
  const int64_t v = p.n, k = p.k;
  double sq = 0;
  for (int64_t i = 0; i < k; ++i) sq += static_cast<double>(p.x[i]) * p.x[i];
  const double c = (std::ldexp(1.0, -8) + std::ldexp(1.0, -17) + 3.0 * k * std::ldexp(1.0, -24));
  const float slack = static_cast<float>(1.25 * c * std::sqrt(sq));
  const __m512 sl = _mm512_set1_ps(slack);
  __m512 tv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < v; i += 16) {
    const __mmask16 m = i + 16 <= v ? 0xffff : static_cast<__mmask16>((1u << (v - i)) - 1);
    const __m512 lo = _mm512_fnmadd_ps(sl, _mm512_maskz_loadu_ps(m, norms + i),
                                       _mm512_maskz_loadu_ps(m, s + i));
    tv = _mm512_mask_max_ps(tv, m, tv, lo);
  }
  const float t = _mm512_reduce_max_ps(tv);
  const bool screened = std::isfinite(slack) && std::isfinite(t);
  const __m512 tt = _mm512_set1_ps(t);
  float best = -std::numeric_limits<float>::infinity();
  int64_t id = -1;
  bool nan = false;
  for (int64_t j = 0; j * kPanelF32 < v; ++j) {
    const int64_t n0 = j * kPanelF32, cols = std::min<int64_t>(kPanelF32, v - n0);
    if (screened) {  // skip the panel unless a column's upper bound reaches t
      __mmask16 hit = 0;
      for (int64_t h = 0; h < cols; h += 16) {
        const int64_t i = n0 + h;
        const __mmask16 m = h + 16 <= cols ? 0xffff
                                           : static_cast<__mmask16>((1u << (cols - h)) - 1);
        const __m512 up = _mm512_fmadd_ps(sl, _mm512_maskz_loadu_ps(m, norms + i),
                                          _mm512_maskz_loadu_ps(m, s + i));
        hit |= _mm512_mask_cmp_ps_mask(m, up, tt, _CMP_GE_OQ);
      }
      if (hit == 0) continue;
    }
    micro_f32<1>(p, 0, j, nullptr);  // exact logits of the panel, into exact[n0 ..)
    for (int64_t i = n0; i < n0 + cols; ++i) {
      nan |= std::isnan(exact[i]);
      if (id < 0 || exact[i] > best) best = exact[i], id = i;
    }
  }
  *out = static_cast<int32_t>(nan || id < 0 ? v : id);
}
#endif

ffi::Error HeadArgmaxImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> scores,
                          ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::F32> norms, ffi::Buffer<ffi::S32> rows,
                          ffi::Result<ffi::Buffer<ffi::S32>> ids) {
#if defined(__AVX512F__)
  auto sd = scores.dimensions();
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (sd.size() != 2 || xd.size() != 2 || wd.size() != 4 || xd[0] != sd[0] || wd[0] != 1 ||
      wd[2] != xd[1] || wd[3] != kPanelF32 || sd[1] > wd[1] * kPanelF32 ||
      sd[1] <= (wd[1] - 1) * kPanelF32 || norms.dimensions().size() != 1 ||
      norms.dimensions()[0] != sd[1] || ids->dimensions().size() != 1 ||
      ids->dimensions()[0] != sd[0]) {
    return ffi::Error::InvalidArgument(
        "head_argmax: need scores [R, V], x [R, K], w [1, NP, K, 32], norms [V], ids [R]");
  }
  const int64_t v = sd[1], k = xd[1];
  int32_t* out = ids->typed_data();
  const int64_t live = std::clamp<int64_t>(rows.typed_data()[0], 0, sd[0]);
  std::fill(out + live, out + sd[0], 0);
  parallel_panels(thread_pool, live, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> exact;
    exact.resize(std::max<size_t>(exact.size(), wd[1] * kPanelF32));
    for (int64_t r = begin; r < end; ++r) {
      ProblemF32 p{x.typed_data() + r * k, w.typed_data(), 1, k, v, wd[1], exact.data()};
      head_argmax_row(p, scores.typed_data() + r * v, norms.typed_data(), exact.data(), out + r);
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("head_argmax: built for a CPU without AVX-512");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearAmx, LinearAmxImpl<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [M, K] bf16
                                  .Arg<ffi::AnyBuffer>()         // w [L, NB, KB, 16, 32] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows of x to compute
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearAmxSwiglu, LinearAmxImpl<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [M, K] bf16
                                  .Arg<ffi::AnyBuffer>()         // w [L, NB, KB, 16, 32] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows of x to compute
                                  .Ret<ffi::AnyBuffer>());       // out [M, F]: silu(gate) * up

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearF32, LinearF32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w [L, NP, K, 32]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()    // rows of x to compute
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearF32Amx, LinearF32AmxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [M, K]
                                  .Arg<ffi::AnyBuffer>()           // w [L, NB, KB, 3, 16, 32] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()    // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()    // rows of x to compute
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedSiluMul, SiluMulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // gate_up [M, 2F]
                                  .Ret<ffi::AnyBuffer>());  // out [M, F]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedRopeQkv, RopeQkvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // qkv [T, (H + 2 KV) E] bf16
                                  .Arg<ffi::Buffer<ffi::F32>>()    // cos [T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // sin [T, E]
                                  .Ret<ffi::AnyBuffer>()           // q [T, H, E]
                                  .Ret<ffi::AnyBuffer>()           // k [T, KV, E]
                                  .Ret<ffi::AnyBuffer>());         // v [T, KV, E]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedHeadArgmax, HeadArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scores [R, V] (bf16 products)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [R, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w [1, NP, K, 32]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // norms [V]: |w_v|
                                  .Arg<ffi::Buffer<ffi::S32>>()    // rows to compute
                                  .Ret<ffi::Buffer<ffi::S32>>());  // ids [R]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearAmxArgmax, LinearAmxArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [M, K] bf16
                                  .Arg<ffi::AnyBuffer>()           // w [1, NB, KB, 16, 32] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()    // rows of x to compute
                                  .Attr<int64_t>("n")              // columns of W (V)
                                  .Ret<ffi::Buffer<ffi::S32>>());  // ids [M]
