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
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
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
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
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

// One (tile, kv head) item: G * Q query rows against the tile's context.
void attend_item(const Problem& p, int64_t tile, int64_t kv_head, std::vector<float>& scratch) {
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

  const int64_t num_pages = max_visible < 0 ? 0 : max_visible / bs + 1;
  const int32_t* table = p.block_tables + tile * p.width;
  const size_t token_stride = static_cast<size_t>(p.num_kv_heads * D) * p.kv_item;
  for (int64_t page = 0; page < num_pages && page < p.width; ++page) {
    const int64_t block = table[page];
    const int64_t first = page * bs;
    const int64_t n = std::min<int64_t>(bs, max_visible + 1 - first);
    const char* k_base =
        p.pool + ((((p.layer * p.num_blocks + block) * 2 + 0) * bs) * p.num_kv_heads + kv_head) *
                     D * p.kv_item;
    const char* v_base = k_base + static_cast<size_t>(bs) * token_stride;
    if (page + 1 < num_pages && page + 1 < p.width) {  // pages are scattered: fetch ahead
      const char* next = p.pool + ((((p.layer * p.num_blocks + table[page + 1]) * 2 + 0) * bs) *
                                       p.num_kv_heads + kv_head) * D * p.kv_item;
      const size_t row_bytes = static_cast<size_t>(D) * p.kv_item;
      for (int64_t t = 0; t < bs; ++t) {
        for (size_t b = 0; b < row_bytes; b += 64) {
          __builtin_prefetch(next + t * token_stride + b);
          __builtin_prefetch(next + (bs + t) * token_stride + b);
        }
      }
    }
    // f32 pools are read in place; other dtypes are converted into kf / vf first
    const bool direct = p.kv_dtype == ffi::DataType::F32;
    const int64_t row_stride = direct ? static_cast<int64_t>(token_stride / sizeof(float)) : D;
    const float* k_rows = direct ? reinterpret_cast<const float*>(k_base) : kf;
    const float* v_rows = direct ? reinterpret_cast<const float*>(v_base) : vf;
    if (!direct) {
      for (int64_t t = 0; t < n; ++t) {
        load_row(k_base + t * token_stride, p.kv_dtype, static_cast<int>(D), kf + t * D);
        load_row(v_base + t * token_stride, p.kv_dtype, static_cast<int>(D), vf + t * D);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = std::min<int64_t>(n, static_cast<int64_t>(last_key[r]) - first + 1);
      if (visible <= 0) continue;
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
}

#if defined(JPAGED_HAVE_AMX)
// ---- bf16 queries over a bf16 pool on AMX tiles ----------------------------------------
//
// Per (tile, kv head) item, the G * Q query rows go in blocks of 16 and the context in blocks
// of 32 keys. Scores are computed transposed, S^T [keys, rows] = K Q^T, so K rows load as A
// tiles and the online softmax runs with one vector per key over 16 rows. P [rows, keys] goes
// back to bf16 as an A tile and V, interleaved by key pairs, is the B tile of P V.
constexpr bool kHaveAmx = true;
constexpr int64_t kKeys = 32;  // keys per block

using jpaged::amx_permitted;
using jpaged::configure_tiles;

void release_tiles() { _tile_release(); }

// e^x for 16 lanes (x <= 0 here): 2^(x log2 e) split into integer and fraction, the fraction
// by a degree-6 polynomial (relative error ~2e-7), scaled back with vscalefps.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
  __m512 y = _mm512_set1_ps(1.5403530393381606e-4f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

struct AmxScratch {
  alignas(64) uint16_t qt[8][16][32];   // Q^T B tiles, one per 32 of D: [pair][row][2]
  alignas(64) uint16_t k[kKeys][kMaxHeadDim];
  alignas(64) uint16_t v[kMaxHeadDim / 16][16][32];  // V B tiles per 16 of D: [pair][d][2]
  alignas(64) float s[kKeys][16];       // S^T
  alignas(64) uint32_t p[16][16];       // P A tile: [row][key pair] bf16 pairs
  alignas(64) uint32_t p_lo[16][16];    // P - bf16(P), the same way
  alignas(64) float pv[16][16];
  alignas(64) float o[16][kMaxHeadDim];
};

// Permutation indices, built once.
struct AmxConstants {
  __m512i lo_words, hi_words;  // vpermt2w: interleave words 0..15 (lo) / 16..31 (hi) of 2 rows
  __m512i pair_words;          // vpermw: (word i, word 16 + i) pairs of one register
  __m512i scatter_idx;         // u32 offsets of the 16 rows of a P tile column
};

const AmxConstants& amx_constants() {
  static const AmxConstants k = [] {
    alignas(64) uint16_t lo[32], hi[32], pairs[32];
    alignas(64) int32_t rows[16];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = i, lo[2 * i + 1] = 32 + i;
      hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
      pairs[2 * i] = i, pairs[2 * i + 1] = 16 + i;
      rows[i] = i * 16;
    }
    return AmxConstants{_mm512_load_si512(lo), _mm512_load_si512(hi), _mm512_load_si512(pairs),
                        _mm512_load_si512(rows)};
  }();
  return k;
}

void attend_item_amx(const Problem& p, int64_t tile, int64_t kv_head, AmxScratch& w) {
  const int64_t D = p.head_dim, Q = p.q_len, G = p.num_heads / p.num_kv_heads;
  const int64_t rows = Q * G, bs = p.block_size, chunks = D / 32;
  const int32_t seq_len = p.seq_lens[tile];
  const int32_t* table = p.block_tables + tile * p.width;
  const size_t token_stride = static_cast<size_t>(p.num_kv_heads * D);  // elements
  const uint16_t* pool = reinterpret_cast<const uint16_t*>(p.pool);
  const uint16_t* qsrc = reinterpret_cast<const uint16_t*>(p.q);
  uint16_t* out = reinterpret_cast<uint16_t*>(p.out);
  const AmxConstants& k = amx_constants();
  const __m512i lo_words = k.lo_words, hi_words = k.hi_words;
  const __m512i scatter_idx = k.scatter_idx, pair_words = k.pair_words;

  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    alignas(64) int32_t last[16];
    int64_t max_visible = -1;
    std::memset(w.qt, 0, sizeof(w.qt));
    for (int64_t m = 0; m < 16; ++m) {
      last[m] = -1;
      if (m >= nr) continue;
      const int64_t r = r0 + m, qi = r / G, h = kv_head * G + r % G;
      const int32_t pos = p.q_positions[tile * Q + qi];
      last[m] = static_cast<int32_t>(std::min<int64_t>(pos, static_cast<int64_t>(seq_len) - 1));
      max_visible = std::max<int64_t>(max_visible, last[m]);
      const uint16_t* qrow = qsrc + ((tile * Q + qi) * p.num_heads + h) * D;
      for (int64_t d = 0; d < D; ++d) w.qt[d / 32][(d % 32) / 2][m * 2 + d % 2] = qrow[d];
    }
    const __m512i last_v = _mm512_load_si512(last);
    __m512 row_max = _mm512_set1_ps(kMaskValue), denom = _mm512_setzero_ps();
    for (int64_t m = 0; m < 16; ++m) std::fill(w.o[m], w.o[m] + D, 0.0f);
    const int64_t kv_end = std::min<int64_t>(max_visible + 1, p.width * bs);

    // K row of `key` (its V row is bs * token_stride further on)
    auto k_row = [&](int64_t key) {
      return pool + ((((p.layer * p.num_blocks + table[key / bs]) * 2) * bs + key % bs) *
                         token_stride +
                     kv_head * D);
    };
    auto prefetch_block = [&](int64_t first) {  // pages are scattered: no hardware prefetch
      for (int64_t key = first; key < std::min(first + kKeys, kv_end); ++key) {
        const char* k = reinterpret_cast<const char*>(k_row(key));
        const char* v = k + bs * token_stride * 2;
        for (int64_t b = 0; b < D * 2; b += 64) {
          _mm_prefetch(k + b, _MM_HINT_T0);
          _mm_prefetch(v + b, _MM_HINT_T0);
        }
      }
    };
    prefetch_block(0);
    for (int64_t k0 = 0; k0 < kv_end; k0 += kKeys) {
      prefetch_block(k0 + kKeys);
      // K: a group of 16 keys inside the context and inside one page is a tile straight from
      // the pool (rows token_stride apart); others are staged with zeros past the context.
      // V key pairs are always staged, interleaved (pool slots past the context may be garbage).
      const uint16_t* direct[2] = {nullptr, nullptr};
      for (int h = 0; h < 2; ++h) {
        const int64_t g0 = k0 + 16 * h;
        if (bs % 16 == 0 && g0 + 15 < kv_end) direct[h] = k_row(g0);
      }
      for (int64_t j = 0; j < kKeys; j += 2) {
        const uint16_t* rows2[2] = {nullptr, nullptr};
        for (int i = 0; i < 2; ++i) {
          const int64_t key = k0 + j + i;
          if (key < kv_end) {
            const uint16_t* base = k_row(key);
            if (direct[(j + i) / 16] == nullptr) std::memcpy(w.k[j + i], base, D * 2);
            rows2[i] = base + bs * token_stride;  // the V row of the same slot
          } else {
            std::memset(w.k[j + i], 0, D * 2);
          }
        }
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512i a = rows2[0] ? _mm512_loadu_si512(rows2[0] + 32 * c) : _mm512_setzero_si512();
          const __m512i b = rows2[1] ? _mm512_loadu_si512(rows2[1] + 32 * c) : _mm512_setzero_si512();
          _mm512_store_si512(w.v[2 * c][j / 2], _mm512_permutex2var_epi16(a, lo_words, b));
          _mm512_store_si512(w.v[2 * c + 1][j / 2], _mm512_permutex2var_epi16(a, hi_words, b));
        }
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
      // online softmax, one vector of 16 rows per key
      const __m512 scale = _mm512_set1_ps(p.scale);
      __mmask16 visible[kKeys];
      __m512 block_max = _mm512_set1_ps(kMaskValue);
      for (int64_t j = 0; j < kKeys; ++j) {
        visible[j] = _mm512_cmpge_epi32_mask(last_v, _mm512_set1_epi32(static_cast<int32_t>(k0 + j)));
        const __m512 sj = _mm512_mask_mul_ps(_mm512_set1_ps(kMaskValue), visible[j],
                                             _mm512_load_ps(w.s[j]), scale);
        _mm512_store_ps(w.s[j], sj);
        block_max = _mm512_max_ps(block_max, sj);
      }
      const __m512 new_max = _mm512_max_ps(row_max, block_max);
      const __m512 rescale = exp16(_mm512_sub_ps(row_max, new_max));
      row_max = new_max;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < kKeys; j += 2) {
        const __m512 pa = _mm512_maskz_mov_ps(visible[j], exp16(_mm512_sub_ps(_mm512_load_ps(w.s[j]), new_max)));
        const __m512 pb = _mm512_maskz_mov_ps(visible[j + 1], exp16(_mm512_sub_ps(_mm512_load_ps(w.s[j + 1]), new_max)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(pa, pb));
        // P = hi + lo, both bf16: P V then loses nothing to P's rounding (~2^-17 relative)
        __m512bh hi = _mm512_cvtne2ps_pbh(pb, pa);  // words 0..15 = pa rows, 16..31 = pb
        const __m512i hi_bits = reinterpret_cast<__m512i&>(hi);
        const __m512 pa_lo = _mm512_sub_ps(
            pa, _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_castsi512_si256(hi_bits))));
        const __m512 pb_lo = _mm512_sub_ps(
            pb, _mm512_cvtpbh_ps(
                    reinterpret_cast<__m256bh>(_mm512_extracti64x4_epi64(hi_bits, 1))));
        __m512bh lo = _mm512_cvtne2ps_pbh(pb_lo, pa_lo);
        const __m512i pairs_hi = _mm512_permutexvar_epi16(pair_words, hi_bits);
        const __m512i pairs_lo =
            _mm512_permutexvar_epi16(pair_words, reinterpret_cast<__m512i&>(lo));
        _mm512_i32scatter_epi32(&w.p[0][j / 2], scatter_idx, pairs_hi, 4);  // column j / 2
        _mm512_i32scatter_epi32(&w.p_lo[0][j / 2], scatter_idx, pairs_lo, 4);
      }
      denom = _mm512_fmadd_ps(denom, rescale, sum);
      alignas(64) float rs[16];
      _mm512_store_ps(rs, rescale);
      // O = O * rescale + P V, 16 of D at a time
      _tile_loadd(5, w.p, 64);
      _tile_loadd(4, w.p_lo, 64);
      for (int64_t e = 0; e < D / 16; ++e) {
        _tile_zero(6);
        _tile_loadd(7, w.v[e], 64);
        _tile_dpbf16ps(6, 5, 7);
        _tile_dpbf16ps(6, 4, 7);
        _tile_stored(6, w.pv, 64);
        for (int64_t m = 0; m < nr; ++m) {
          float* o = &w.o[m][16 * e];
          _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o), _mm512_set1_ps(rs[m]),
                                             _mm512_load_ps(w.pv[m])));
        }
      }
    }
    alignas(64) float dn[16];
    _mm512_store_ps(dn, denom);
    for (int64_t m = 0; m < nr; ++m) {
      const int64_t r = r0 + m, qi = r / G, h = kv_head * G + r % G;
      const float inv = dn[m] > 0.0f ? 1.0f / dn[m] : 0.0f;
      uint16_t* dst = out + ((tile * Q + qi) * p.num_heads + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = f32_to_bf16(dn[m] > 0.0f ? w.o[m][d] * inv : 0.0f);
    }
  }
}
#else
constexpr bool kHaveAmx = false;
struct AmxScratch {};
bool amx_permitted() { return false; }
void configure_tiles() {}
void release_tiles() {}
void attend_item_amx(const Problem&, int64_t, int64_t, AmxScratch&) {}
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
    for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) {
      if (amx) {
        attend_item_amx(p, i / p.num_kv_heads, i % p.num_kv_heads, *tiles);
      } else {
        attend_item(p, i / p.num_kv_heads, i % p.num_kv_heads, scratch);
      }
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
