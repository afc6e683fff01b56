// The bf16 linears on AVX2 + FMA, for CPUs without AMX (AMD Zen 2 / 3, older Intel): part of
// linear_cpu.cc (included there, after its Problem), not a header of its own.
//
// W keeps the AMX kernels' packing: per 16 columns, each k pair is one 64-byte line of 16
// dwords, dword j holding w[k, j] in its low half and w[k + 1, j] in its high half, so a
// shift and a mask widen both rows to f32 exactly. x is widened to f32 once per call. A micro
// kernel keeps 6 rows x 16 columns of y in 12 ymm accumulators; f32 products and sums, as
// TDPBF16PS gives, in a different order. The epilogues take a block of up to 6 rows x 32
// columns (two 16-column tiles), as the AMX ones take 32 x 32.
//
// Where the CPU has AVX512-BF16 but no AMX (AMD Zen 4 / 5, Intel Cooper Lake), x stays bf16
// and VDPBF16PS takes a k pair of 16 columns per instruction, straight from the packed line:
// a broadcast dword of x (x[k], x[k + 1]) against the line adds both exact products to each
// column's f32 sum. Up to 14 rows x 32 columns of y in 28 zmm accumulators.
#pragma once

#if defined(JPAGED_BF16_AVX2)

#if defined(JPAGED_BF16_DPBF16)  // defined in linear_cpu.cc
constexpr int64_t kRowsAvx2 = 14;    // rows of y per micro block (VDPBF16PS: both tiles)
#else
constexpr int64_t kRowsAvx2 = 6;     // rows of y per micro block
#endif
constexpr int64_t kGroupAvx2 = 98;   // rows of x per group (K <= 1536: f32 588 KB, bf16 294)

using jpaged::bf16_8_to_f32;
using jpaged::exp8;

// silu(g) = g * sigmoid(g), sigmoid from e^-|g| (as silu16).
inline __m256 silu8(__m256 g) {
  const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), abs));
  const __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_mul_ps(g, _mm256_blendv_ps(r, _mm256_mul_ps(r, e), neg));
}

// 8 floats -> bf16 bits, nearest even, NaN stays NaN (as jpaged::f32_to_bf16).
inline __m128i to_bf16_8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline __m256 round_bf16_8(__m256 v) { return bf16_8_to_f32(to_bf16_8(v)); }

#if defined(JPAGED_BF16_DPBF16)
// Copies x's first p.m rows into this thread's buffer, [m, 32 kb] bf16 zero padded, and
// points p.x at it (each k pair one aligned dword).
inline void widen_x(const uint16_t* src, int64_t k, Problem& p) {
  const int64_t kp = p.kb * kTileK;
  thread_local std::vector<uint16_t> buf;
  buf.resize(std::max<size_t>(buf.size(), p.m * kp));
  for (int64_t r = 0; r < p.m; ++r) {
    std::memcpy(buf.data() + r * kp, src + r * k, k * 2);
    std::memset(buf.data() + r * kp + k, 0, (kp - k) * 2);
  }
  p.x = buf.data();
}

// Rows m0 .. m0 + MR - 1 of y x the 32 columns of B tile columns nb and nb + 1, into c (row
// stride 32). pf: where to fetch `pf_lines` 64-byte lines into L2 per k pair from (a share of
// the next panel), or null.
template <int MR>
void micro_dp(const Problem& p, int64_t m0, int64_t nb, float* c, const char* pf, int pf_lines) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t kp = p.kb * kTileK;
  const __m512i* b0 = reinterpret_cast<const __m512i*>(p.w + nb * p.kb * kTileElems);
  const __m512i* b1 = b0 + p.kb * kTileElems / 32;
  const uint32_t* a = reinterpret_cast<const uint32_t*>(p.x + m0 * kp);
  for (int64_t t = 0; t < kp / 2; ++t) {  // k pairs: one line of 16 dwords per tile
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b0 + t));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b1 + t));
    if (pf != nullptr) {
      for (int l = 0; l < pf_lines; ++l) _mm_prefetch(pf + 64 * (pf_lines * t + l), _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * kp / 2 + t])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, w1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(c + r * 2 * kTileN, acc[r][0]);
    _mm512_storeu_ps(c + r * 2 * kTileN + kTileN, acc[r][1]);
  }
}

void rows_dp(const Problem& p, int64_t m0, int64_t rows, int64_t nb, float* c, const char* pf,
             int pf_lines) {
  switch (rows) {
#define JPAGED_ROWS(R) \
  case R:              \
    return micro_dp<R>(p, m0, nb, c, pf, pf_lines);
    JPAGED_ROWS(1) JPAGED_ROWS(2) JPAGED_ROWS(3) JPAGED_ROWS(4) JPAGED_ROWS(5) JPAGED_ROWS(6)
    JPAGED_ROWS(7) JPAGED_ROWS(8) JPAGED_ROWS(9) JPAGED_ROWS(10) JPAGED_ROWS(11) JPAGED_ROWS(12)
    JPAGED_ROWS(13) JPAGED_ROWS(14)
#undef JPAGED_ROWS
    default:
      return;
  }
}
#else
// Widens x's first p.m rows to f32 into this thread's buffer, [m, 32 kb] zero padded, and
// points p.xf at it.
inline void widen_x(const uint16_t* src, int64_t k, Problem& p) {
  const int64_t kp = p.kb * kTileK;
  thread_local std::vector<float> buf;
  buf.resize(std::max<size_t>(buf.size(), p.m * kp));
  for (int64_t r = 0; r < p.m; ++r) {
    const uint16_t* s = src + r * k;
    float* d = buf.data() + r * kp;
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
      _mm256_storeu_ps(d + c, bf16_8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + c))));
    }
    for (; c < k; ++c) {
      const uint32_t bits = static_cast<uint32_t>(s[c]) << 16;
      std::memcpy(d + c, &bits, 4);
    }
    for (; c < kp; ++c) d[c] = 0.0f;
  }
  p.xf = buf.data();
}

// Rows m0 .. m0 + MR - 1 of y x the 16 columns of B tile column `nb`, into c (row stride 32).
template <int MR>
void micro_bf16(const Problem& p, int64_t m0, int64_t nb, float* c) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int64_t kp = p.kb * kTileK;
  const __m256i* b = reinterpret_cast<const __m256i*>(p.w + nb * p.kb * kTileElems);
  const float* a = p.xf + m0 * kp;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t t = 0; t < kp / 2; ++t) {  // k pairs: one line of 16 dwords each
    const __m256i w0 = _mm256_loadu_si256(b + 2 * t), w1 = _mm256_loadu_si256(b + 2 * t + 1);
    __m256 b0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));  // k = 2t
    __m256 b1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * kp + 2 * t);
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
    }
    b0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));  // k = 2t + 1
    b1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * kp + 2 * t + 1);
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * 2 * kTileN, acc[r][0]);
    _mm256_storeu_ps(c + r * 2 * kTileN + 8, acc[r][1]);
  }
}

void rows_bf16(const Problem& p, int64_t m0, int64_t rows, int64_t nb, float* c) {
  switch (rows) {
#define JPAGED_ROWS(R) \
  case R:              \
    return micro_bf16<R>(p, m0, nb, c);
    JPAGED_ROWS(1) JPAGED_ROWS(2) JPAGED_ROWS(3) JPAGED_ROWS(4) JPAGED_ROWS(5) JPAGED_ROWS(6)
#undef JPAGED_ROWS
    default:
      return;
  }
}
#endif  // JPAGED_BF16_DPBF16

#if !defined(JPAGED_BF16_DPBF16)  // else the 16-wide ones of linear_cpu.cc
// The epilogues, as the AMX ones: c holds `rows` rows x 32 columns (row stride 32).
void argmax_rows(const Problem& p, const float* c, int64_t m0, int64_t rows, int64_t n0) {
  const int64_t cols = std::min<int64_t>(2 * kTileN, p.n - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = m0 + r;
    const float* src = c + r * 2 * kTileN;
    float top = p.best[row];
    int32_t id = p.best_id[row];
    bool nan = false;
    for (int64_t j = 0; j < cols; ++j) {
      nan |= std::isnan(src[j]);
      if (src[j] > top || (id == std::numeric_limits<int32_t>::max() && src[j] >= top)) {
        top = src[j];
        id = static_cast<int32_t>(n0 + j);
      }
    }
    if (nan) {
      p.has_nan[row] = 1;
    } else {
      p.best[row] = top;
      p.best_id[row] = id;
    }
  }
}

void write_swiglu_rows(const Problem& p, const float* c, int64_t m0, int64_t rows, int64_t n0) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = c + r * 2 * kTileN;
    uint16_t* dst = static_cast<uint16_t*>(p.out) + (m0 + r) * p.n + n0;
    for (int64_t j = 0; j < kTileN; j += 8) {
      const __m256 g = round_bf16_8(_mm256_loadu_ps(src + j));
      const __m256 u = round_bf16_8(_mm256_loadu_ps(src + kTileN + j));
      const __m256 s = round_bf16_8(silu8(g));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), to_bf16_8(_mm256_mul_ps(s, u)));
    }
  }
}

void write_rows(const Problem& p, const float* c, int64_t m0, int64_t rows, int64_t n0) {
  const int64_t cols = std::min<int64_t>(2 * kTileN, p.n - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = c + r * 2 * kTileN;
    if (p.out_f32) {
      std::memcpy(static_cast<float*>(p.out) + (m0 + r) * p.n + n0, src, cols * sizeof(float));
      continue;
    }
    uint16_t* dst = static_cast<uint16_t*>(p.out) + (m0 + r) * p.n + n0;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), to_bf16_8(_mm256_loadu_ps(src + j)));
    }
    for (; j < cols; ++j) dst[j] = jpaged::f32_to_bf16(src[j]);
  }
}
#endif

// Panels [begin, end) (32 columns each) for every row, in groups of kGroupAvx2 rows.
// Row groups [first_group, last_group) only (all by default).
void panels(const Problem& p, int64_t begin, int64_t end, int64_t first_group = 0,
            int64_t last_group = -1) {
  alignas(64) float c[kRowsAvx2 * 2 * kTileN];
  const int64_t rows_end = last_group < 0 ? p.m : std::min(p.m, last_group * kGroupAvx2);
  for (int64_t g0 = first_group * kGroupAvx2; g0 < rows_end; g0 += kGroupAvx2) {
    const int64_t g1 = std::min(p.m, g0 + kGroupAvx2);
    // the group in equal blocks of at most kRowsAvx2 rows (VDPBF16PS, 64 rows: 5 x 13, not
    // 4 x 14 + 8)
    const int64_t blocks = (g1 - g0 + kRowsAvx2 - 1) / kRowsAvx2;
    const int64_t step = (g1 - g0 + blocks - 1) / blocks;
#if defined(JPAGED_BF16_DPBF16)
    // the blocks after the first fetch the next panel into L2, an equal share each spread over
    // their k pairs (pf_lines lines a pair), so its first block does not wait on memory (M = 64,
    // 30 layers: 32.8 vs 36.0 ms, linear_ab.py)
    const int64_t pairs = p.kb * kTileK / 2, panel_lines = 2 * p.kb * kTileElems * 2 / 64;
    const int pf_lines = blocks > 1 ? static_cast<int>(std::min<int64_t>(
                                          4, (panel_lines + pairs * (blocks - 1) - 1) /
                                                 (pairs * (blocks - 1))))
                                    : 0;
#endif
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t m0 = g0, s = 0; m0 < g1; m0 += step, ++s) {
        const int64_t rows = std::min(step, g1 - m0);
#if defined(JPAGED_BF16_DPBF16)
        const int64_t first_line = (s - 1) * pairs * pf_lines;  // of the next panel
        const char* pf = nullptr;
        if (s > 0 && i + 1 < end && first_line < panel_lines) {
          pf = reinterpret_cast<const char*>(p.w + 2 * (i + 1) * p.kb * kTileElems) +
               64 * first_line;
        }
        rows_dp(p, m0, rows, 2 * i, c, pf, pf_lines);
#else
        rows_bf16(p, m0, rows, 2 * i, c);
        rows_bf16(p, m0, rows, 2 * i + 1, c + kTileN);
#endif
        if (p.best != nullptr) {
          argmax_rows(p, c, m0, rows, 2 * kTileN * i);
        } else if (p.swiglu) {
          write_swiglu_rows(p, c, m0, rows, kTileN * i);
        } else {
          write_rows(p, c, m0, rows, 2 * kTileN * i);
        }
      }
    }
  }
}

#if !defined(__AVX512F__)
#define JPAGED_SILU_MUL_AVX2 1
// silu(gate) * up for one row, as the AVX-512 silu_mul_row (bf16: silu rounded, then the
// product).
template <typename T>
void silu_mul_row(const T* gu, int64_t f, T* out) {
  int64_t j = 0;
  for (; j + 8 <= f; j += 8) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(out + j, _mm256_mul_ps(silu8(_mm256_loadu_ps(gu + j)),
                                              _mm256_loadu_ps(gu + f + j)));
    } else {
      const auto* g = reinterpret_cast<const __m128i*>(gu + j);
      const auto* u = reinterpret_cast<const __m128i*>(gu + f + j);
      const __m256 s = round_bf16_8(silu8(bf16_8_to_f32(_mm_loadu_si128(g))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                       to_bf16_8(_mm256_mul_ps(s, bf16_8_to_f32(_mm_loadu_si128(u)))));
    }
  }
  for (; j < f; ++j) {  // the tail, one lane at a time
    alignas(32) float g[8] = {}, u[8] = {};
    if constexpr (std::is_same_v<T, float>) {
      g[0] = gu[j];
      u[0] = gu[f + j];
      out[j] = _mm256_cvtss_f32(_mm256_mul_ps(silu8(_mm256_load_ps(g)), _mm256_load_ps(u)));
    } else {
      const uint32_t gb = static_cast<uint32_t>(gu[j]) << 16, ub = static_cast<uint32_t>(gu[f + j]) << 16;
      std::memcpy(g, &gb, 4);
      std::memcpy(u, &ub, 4);
      const __m256 s = round_bf16_8(silu8(_mm256_load_ps(g)));
      out[j] = static_cast<uint16_t>(_mm_extract_epi16(to_bf16_8(_mm256_mul_ps(s, _mm256_load_ps(u))), 0));
    }
  }
}
#endif

#endif  // JPAGED_BF16_AVX2
