// Row reductions over [S, V] f32 logits for the sampler (see sampling_cpu.py), as XLA FFI
// custom calls. XLA:CPU runs each of these as separate passes at ~2 GB/s (a greedy decode
// step over SmolLM2's 49152-token vocabulary at S = 64 spent ~7 ms in them); here each row is
// read once or twice with AVX-512 (or AVX2 + FMA), rows shared over XLA's intra-op pool.
//
// JpagedRowArgmax: ids [S] i32, the first index of each row's maximum (jnp.argmax for
//   NaN-free rows); V for a row holding a NaN (the XLA path gives V there too).
// JpagedRowLogprob: for chosen ids [S] i32 (clipped to [0, V)), lse [S] f32 =
//   log(sum(exp(x))) (max-shifted, as jax.nn.logsumexp), and rank [S] i32 = how many of the
//   row's values are >= the chosen one.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? 0xffff : static_cast<__mmask16>((1u << remaining) - 1);
}

// Max of a row and whether it holds a NaN.
inline float row_max(const float* x, int64_t v, bool* has_nan) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = neg_inf;
  __mmask16 nan = 0;
  for (int64_t i = 0; i < v; i += 16) {
    const __mmask16 k = tail_mask(v - i);
    const __m512 a = _mm512_mask_loadu_ps(neg_inf, k, x + i);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, a);
  }
  *has_nan = nan != 0;
  return _mm512_reduce_max_ps(m);
}

void argmax_row(const float* x, int64_t v, int32_t* out) {
  bool has_nan = false;
  const float m = row_max(x, v, &has_nan);
  if (has_nan) {
    *out = static_cast<int32_t>(v);
    return;
  }
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t i = 0; i < v; i += 16) {
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail_mask(v - i), _mm512_loadu_ps(x + i), mv,
                                                  _CMP_EQ_OQ);
    if (hit) {
      *out = static_cast<int32_t>(i + __builtin_ctz(hit));
      return;
    }
  }
  *out = static_cast<int32_t>(v);  // unreachable for NaN-free rows
}

void logprob_row(const float* x, int64_t v, int32_t id, float* lse, int32_t* rank) {
  bool has_nan = false;
  const float m = row_max(x, v, &has_nan);
  const float chosen = x[std::clamp<int64_t>(id, 0, v - 1)];
  const __m512 cv = _mm512_set1_ps(chosen);
  int64_t count = 0;
  if (has_nan || !std::isfinite(m)) {  // NaN, or an all -inf / +inf row: as logsumexp does
    for (int64_t i = 0; i < v; ++i) count += x[i] >= chosen;
    *lse = has_nan ? std::numeric_limits<float>::quiet_NaN()
                   : (m > 0 ? m : -std::numeric_limits<float>::infinity());
    *rank = static_cast<int32_t>(count);
    return;
  }
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < v; i += 16) {
    const __mmask16 k = tail_mask(v - i);
    const __m512 a = _mm512_maskz_loadu_ps(k, x + i);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, jpaged::exp16(_mm512_sub_ps(a, mv))));
    count += __builtin_popcount(_mm512_mask_cmp_ps_mask(k, a, cv, _CMP_GE_OQ));
  }
  *lse = m + std::log(_mm512_reduce_add_ps(sum));
  *rank = static_cast<int32_t>(count);
}

#elif defined(__AVX2__) && defined(__FMA__)
// The same passes on AVX2 + FMA: 8 lanes, the last V % 8 values scalar.
inline float row_max(const float* x, int64_t v, bool* has_nan) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= v; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, a);
  }
  float best = jpaged::reduce_max8(m);
  *has_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < v; ++i) {
    *has_nan |= std::isnan(x[i]);
    best = std::max(best, x[i]);
  }
  return best;
}

void argmax_row(const float* x, int64_t v, int32_t* out) {
  bool has_nan = false;
  const float m = row_max(x, v, &has_nan);
  *out = static_cast<int32_t>(v);  // also for a row holding a NaN
  if (has_nan) return;
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= v; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
    if (hit) {
      *out = static_cast<int32_t>(i + __builtin_ctz(hit));
      return;
    }
  }
  for (; i < v; ++i) {
    if (x[i] == m) {
      *out = static_cast<int32_t>(i);
      return;
    }
  }
}

void logprob_row(const float* x, int64_t v, int32_t id, float* lse, int32_t* rank) {
  bool has_nan = false;
  const float m = row_max(x, v, &has_nan);
  const float chosen = x[std::clamp<int64_t>(id, 0, v - 1)];
  int64_t count = 0;
  if (has_nan || !std::isfinite(m)) {  // NaN, or an all -inf / +inf row: as logsumexp does
    for (int64_t i = 0; i < v; ++i) count += x[i] >= chosen;
    *lse = has_nan ? std::numeric_limits<float>::quiet_NaN()
                   : (m > 0 ? m : -std::numeric_limits<float>::infinity());
    *rank = static_cast<int32_t>(count);
    return;
  }
  const __m256 mv = _mm256_set1_ps(m), cv = _mm256_set1_ps(chosen);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= v; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    sum = _mm256_add_ps(sum, jpaged::exp8(_mm256_sub_ps(a, mv)));
    count += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(a, cv, _CMP_GE_OQ)));
  }
  float total = jpaged::reduce_add8(sum);
  for (; i < v; ++i) {
    total += std::exp(x[i] - m);
    count += x[i] >= chosen;
  }
  *lse = m + std::log(total);
  *rank = static_cast<int32_t>(count);
}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define JPAGED_SAMPLING_SIMD 1
// fn(row) for every row, rows claimed in chunks by the pool's workers.
template <typename Fn>
void for_rows(ffi::ThreadPool& pool, int64_t rows, Fn fn) {
  constexpr int64_t kChunk = 4;
  std::atomic<int64_t> next{0};
  jpaged::run_workers(pool, (rows + kChunk - 1) / kChunk, [&](int64_t) {
    for (int64_t r0 = next.fetch_add(kChunk); r0 < rows; r0 = next.fetch_add(kChunk)) {
      for (int64_t r = r0; r < std::min(rows, r0 + kChunk); ++r) fn(r);
    }
  });
}
#endif  // JPAGED_SAMPLING_SIMD

ffi::Error RowArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Result<ffi::Buffer<ffi::S32>> ids) {
#if defined(JPAGED_SAMPLING_SIMD)
  auto d = x.dimensions();
  if (d.size() != 2 || ids->dimensions().size() != 1 || ids->dimensions()[0] != d[0] ||
      d[1] == 0) {
    return ffi::Error::InvalidArgument("row_argmax: x must be [S, V > 0], ids [S]");
  }
  const float* xs = x.typed_data();
  int32_t* out = ids->typed_data();
  const int64_t v = d[1];
  for_rows(pool, d[0], [&](int64_t r) { argmax_row(xs + r * v, v, out + r); });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("row_argmax: built for a CPU without AVX-512 or AVX2 + FMA");
#endif
}

ffi::Error RowLogprobImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::S32>> rank) {
#if defined(JPAGED_SAMPLING_SIMD)
  auto d = x.dimensions();
  if (d.size() != 2 || d[1] == 0 || ids.dimensions().size() != 1 || ids.dimensions()[0] != d[0]) {
    return ffi::Error::InvalidArgument("row_logprob: x must be [S, V > 0], ids [S]");
  }
  const float* xs = x.typed_data();
  const int32_t* chosen = ids.typed_data();
  float* lse_out = lse->typed_data();
  int32_t* rank_out = rank->typed_data();
  const int64_t v = d[1];
  for_rows(pool, d[0], [&](int64_t r) {
    logprob_row(xs + r * v, v, chosen[r], lse_out + r, rank_out + r);
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("row_logprob: built for a CPU without AVX-512 or AVX2 + FMA");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedRowArgmax, RowArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [S, V]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // ids [S]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedRowLogprob, RowLogprobImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [S, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // chosen ids [S]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse [S]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // rank [S]
