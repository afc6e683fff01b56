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

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

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

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

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
    for (int64_t t = 0; t < n; ++t) {
      load_row(k_base + t * token_stride, p.kv_dtype, static_cast<int>(D), kf + t * D);
      load_row(v_base + t * token_stride, p.kv_dtype, static_cast<int>(D), vf + t * D);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = std::min<int64_t>(n, static_cast<int64_t>(last_key[r]) - first + 1);
      if (visible <= 0) continue;
      float* s = scores + r * bs;
      float page_max = kMaskValue;
      for (int64_t t = 0; t < visible; ++t) {
        s[t] = dot(qf + r * D, kf + t * D, static_cast<int>(D));
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
        const float* v = vf + t * D;
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
  std::atomic<int64_t> next{0};
  auto work = [&p, &next, num_items]() {
    std::vector<float> scratch;
    for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) {
      attend_item(p, i / p.num_kv_heads, i % p.num_kv_heads, scratch);
    }
  };
  const int64_t num_workers =
      std::max<int64_t>(1, std::min<int64_t>(thread_pool.num_threads(), num_items));
  if (num_workers == 1) {
    work();
    return ffi::Error::Success();
  }
  std::mutex mu;
  std::condition_variable cv;
  int64_t pending = num_workers - 1;
  for (int64_t w = 0; w < num_workers - 1; ++w) {
    thread_pool.Schedule([&work, &mu, &cv, &pending]() {
      work();
      std::lock_guard<std::mutex> lock(mu);
      if (--pending == 0) cv.notify_one();
    });
  }
  work();  // the calling thread takes items too
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&pending] { return pending == 0; });
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
