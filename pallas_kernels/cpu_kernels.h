// Shared by the C++ CPU kernels (paged_attention_cpu.cc, linear_cpu.cc): running work on XLA's
// intra-op thread pool, and Intel AMX set-up. Compiled into each kernel (header only).
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jpaged {

// f32 -> bf16 bits, rounded to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

// How long run_workers' caller spins for running tasks before it sleeps on its condition
// variable: a step makes ~180 of these calls, and a futex sleep and wake-up costs tens of
// microseconds in a VM. JPAGED_SPIN_US overrides it (0: sleep at once).
inline int64_t spin_limit_ns() {
  static const int64_t limit = [] {
    const char* env = std::getenv("JPAGED_SPIN_US");
    return (env != nullptr ? std::atoll(env) : 100) * 1000;
  }();
  return limit;
}

// Runs work(w) for every w in [0, num_workers), num_workers = min(pool threads, max_workers),
// and returns when all have finished. The calling thread claims worker indices too, and a pool
// task that starts after every index is taken does nothing: XLA may run two custom calls at
// once on the pool's own threads, and if each waited for tasks queued behind the other, both
// would wait forever. So the caller never waits for a task that has not started; it runs the
// unclaimed indices itself and waits only for those already running.
template <typename Work>
void run_workers(xla::ffi::ThreadPool& thread_pool, int64_t max_workers, Work work) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  const int64_t num_workers =
      std::max<int64_t>(1, std::min<int64_t>(thread_pool.num_threads(), max_workers));
  // Shared so that a task starting after this call has returned still finds live state.
  auto state = std::make_shared<State>();
  // Runs unclaimed indices until none is left; work is only touched for a claimed index,
  // and this call cannot return before that index is done.
  auto drain = [num_workers](State& s, Work& fn) {
    int64_t ran = 0;
    for (int64_t w = s.next.fetch_add(1); w < num_workers; w = s.next.fetch_add(1)) {
      fn(w);
      ++ran;
    }
    if (ran == 0) return;
    if (s.done.fetch_add(ran) + ran == num_workers) {
      std::lock_guard<std::mutex> lock(s.mu);  // the waiter checks done under this lock
      s.cv.notify_all();
    }
  };
  for (int64_t w = 1; w < num_workers; ++w) {
    thread_pool.Schedule([state, &work, drain]() { drain(*state, work); });
  }
  drain(*state, work);
  if (state->done.load() == num_workers) return;
  const int64_t limit = spin_limit_ns();
  if (limit > 0) {  // every index is claimed: the rest are running and end soon
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 1; state->done.load(std::memory_order_acquire) != num_workers; ++i) {
      _mm_pause();
      if (i % 64 == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(limit)) break;
    }
  }
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&state, num_workers] { return state->done.load() == num_workers; });
}

// 2^f for f in [-0.5, 0.5]: degree-6 polynomial coefficients, highest first (relative error
// ~2e-7), shared by exp16 and exp8.
constexpr float kExp2Poly[7] = {1.5403530393381606e-4f, 1.3333558146428443e-3f,
                                9.6181291076284772e-3f, 5.5504108664821580e-2f,
                                2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};
constexpr float kLog2e = 1.44269504088896341f;

#if defined(__AVX512F__)
// e^x for 16 lanes, for x <= 0 (below -100 it gives e^-100): 2^(x log2 e) split into integer
// and fraction, the fraction by kExp2Poly, scaled back with vscalefps.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(kLog2e));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
  __m512 y = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(y, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// e^x for 8 lanes, x <= 0 (below -87 it gives e^-87, a normal float): as exp16, with 2^n put
// together in the exponent field.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 y = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The max / the sum of 8 lanes (halves, then pairs).
inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 bf16 values -> f32, exactly (bf16 bits are an f32's upper half: widen, then shift).
inline __m256 bf16_8_to_f32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define JPAGED_HAVE_AMX 1

// Linux grants the 8 KB tile state only on request, once per process.
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// Palette 1 with all 8 tiles at 16 rows x 64 bytes; the configuration is per thread.
inline void configure_tiles() {
  struct alignas(64) {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}
#endif

}  // namespace jpaged
