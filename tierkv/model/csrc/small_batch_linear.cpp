// y = x W^T + b for a few rows of x: the linear layers of a decode step at small batch.
//
// At batch 1 a decode step is the weights streaming through the cache once; torch's matrix
// product reaches about 21 GB/s in float32 and 15-17 GB/s in bfloat16 on this project's
// reference CPU for a small model's weight shapes, against about 35 GB/s the memory reads at.
// This kernel walks R weight rows at a time (independent row streams keep enough loads in
// flight), each 16-float block multiplied with every input row into its own float32
// accumulator, then reduced once per row. bfloat16 weights use the CPU's bf16 dot product
// (vdpbf16ps: exact products, float32 sums) where the compiler targets it, else they are widened
// to float32 in registers. Output rows are split over torch's intra-op threads.
//
// Registered as torch.ops.tierkv.small_batch_linear; tierkv/model/layers.py calls it for up to
// kMaxRows rows of float32 or bfloat16 and torch's linear otherwise.
//
// torch.ops.tierkv.invariant_linear is the same computation for any number of rows, tiled for
// many: every output element is summed in an order fixed by `in` alone, so a row's result is
// bit for bit the same whatever rows share the call (the engine's batch-invariant mode;
// oneDNN's rounding of a row follows the shape of the whole product).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "simd.h"  // tierkv/csrc, on the include path

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 4;

#ifdef __AVX512BF16__
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

using tierkv_simd::f32x16;
using tierkv_simd::hsum;
using tierkv_simd::load;

// Dot products of weight rows [row0, row0 + R) with the N input rows `x` (float32, [N, in]),
// written as float32 to acc[r * N + n].
template <typename W, int R, int N>
void dot_rows(const float* x, int64_t in, const W* w, int64_t row0, float* acc) {
  f32x16 sums[R][N] = {};
  const int64_t full = in / 16 * 16;
  for (int64_t i = 0; i < full; i += 16) {
    f32x16 xv[N];
    for (int n = 0; n < N; ++n) xv[n] = load(x + n * in + i);
    for (int r = 0; r < R; ++r) {
      const f32x16 wv = load(w + (row0 + r) * in + i);
      for (int n = 0; n < N; ++n) sums[r][n] += wv * xv[n];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      float s = hsum(sums[r][n]);
      for (int64_t i = full; i < in; ++i)
        s += static_cast<float>(w[(row0 + r) * in + i]) * x[n * in + i];
      acc[r * N + n] = s;
    }
  }
}

#ifdef __AVX512BF16__
// The sum of a vector's 16 lanes by a fixed tree: lane i + lane i+8, then + 4, + 2, + 1 (the
// order GCC's _mm512_reduce_add_ps takes, written out so that no compiler may choose another).
inline float reduce_tree(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

// reduce_tree of 16 vectors at once, the same additions of the same lanes (so the same sums
// bit for bit) in 15 vector additions instead of 16 x 4: element 4m + L of the result is
// reduce_tree(v[4L + m]).
inline __m512 reduce_tree16_vec(const __m512* v) {
  __m512 s[8], u[4], w[2];
  // Lanes i and i+8 of v[2j] and v[2j+1]: 128-bit lanes [v0 l0+l2, v0 l1+l3, v1 ..., v1 ...].
  for (int j = 0; j < 8; ++j)
    s[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  // + 4: 128-bit lane L of u[j] holds the four partial sums of v[4j + L].
  for (int j = 0; j < 4; ++j)
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0xDD));
  // + 2: lane L of w[j] holds the two partial sums of v[8j + L] and of v[8j + 4 + L].
  for (int j = 0; j < 2; ++j)
    w[j] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // + 1: element 4L + m is the sum of v[4m + L].
  return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// acc[k] = reduce_tree(v[k]) for 16 vectors.
inline void reduce_tree16(const __m512* v, float* acc) {
  alignas(64) float d[16];
  _mm512_store_ps(d, reduce_tree16_vec(v));
  for (int k = 0; k < 16; ++k) acc[k] = d[4 * (k % 4) + k / 4];
}

// Four weight rows against four input rows (`in` a multiple of 32), as dot_rows_bf16<4, 4>
// sums them, returned as one vector whose element 4n + r is input row n times weight row r.
inline __m512 dot_4x4_bf16(const at::BFloat16* xb, int64_t in, const at::BFloat16* w,
                           int64_t row0) {
  __m512 sums[4][4];
  for (int r = 0; r < 4; ++r)
    for (int n = 0; n < 4; ++n) sums[r][n] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    __m512bh xv[4];
    for (int n = 0; n < 4; ++n) xv[n] = (__m512bh)_mm512_loadu_si512(xb + n * in + i);
    for (int r = 0; r < 4; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (row0 + r) * in + i);
      for (int n = 0; n < 4; ++n) sums[r][n] = _mm512_dpbf16_ps(sums[r][n], wv, xv[n]);
    }
  }
  return reduce_tree16_vec(&sums[0][0]);
}

// The same for bfloat16 weights and inputs (`xb`, [N, in]) with the bf16 dot-product
// instruction, 32 channels per step. Each output is the same float32 sums in the same order
// whatever R and N (lane-wise dot products over the blocks, reduce_tree, the remainder), so a
// row's result does not depend on the rows computed with it.
template <int R, int N>
void dot_rows_bf16(const at::BFloat16* xb, int64_t in, const at::BFloat16* w, int64_t row0,
                   float* acc) {
  __m512 sums[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) sums[r][n] = _mm512_setzero_ps();
  const int64_t full = in / 32 * 32;
  for (int64_t i = 0; i < full; i += 32) {
    __m512bh xv[N];
    for (int n = 0; n < N; ++n) xv[n] = (__m512bh)_mm512_loadu_si512(xb + n * in + i);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (row0 + r) * in + i);
      for (int n = 0; n < N; ++n) sums[r][n] = _mm512_dpbf16_ps(sums[r][n], wv, xv[n]);
    }
  }
  if constexpr (R * N == 16) {
    reduce_tree16(&sums[0][0], acc);
  } else {
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) acc[r * N + n] = reduce_tree(sums[r][n]);
  }
  if (full == in) return;
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      float s = acc[r * N + n];
      for (int64_t i = full; i < in; ++i)
        s += static_cast<float>(w[(row0 + r) * in + i]) * static_cast<float>(xb[n * in + i]);
      acc[r * N + n] = s;
    }
  }
}
#endif

template <typename W, int R, int N>
void rows(const W* xw, const float* xf, int64_t in, const W* w, int64_t row0, float* acc) {
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<W, at::BFloat16>) {
    dot_rows_bf16<R, N>(xw, in, w, row0, acc);
    return;
  }
#endif
  (void)xw;
  dot_rows<W, R, N>(xf, in, w, row0, acc);
}

template <typename W, int N>
void run(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
         at::Tensor& y) {
  // Eight row streams at one or two inputs, four beyond, so the R x N accumulators stay in
  // registers.
  constexpr int R = N <= 2 ? 8 : 4;
  const int64_t in = weight.size(1), out = weight.size(0);
  const W* xw = x.data_ptr<W>();
  // The float32 copy of x the widening paths read (the bf16 dot product reads x itself).
  const bool widen = !(std::is_same_v<W, at::BFloat16> && kBf16Dot);
  const at::Tensor xf = widen ? x.to(at::kFloat).contiguous() : at::Tensor();
  const float* xfp = widen ? xf.data_ptr<float>() : nullptr;
  const W* w = weight.data_ptr<W>();
  const W* b = bias.has_value() ? bias->data_ptr<W>() : nullptr;
  W* yp = y.data_ptr<W>();
  auto finish = [&](int64_t row0, int r_count, const float* acc) {
    for (int r = 0; r < r_count; ++r) {
      const float add = b ? static_cast<float>(b[row0 + r]) : 0.0f;
      for (int n = 0; n < N; ++n) yp[n * out + row0 + r] = static_cast<W>(acc[r * N + n] + add);
    }
  };
  const int64_t blocks = out / R;
  // At least 64 KiB of weights per task: below that the threads' start costs more.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (R * in * weight.element_size()));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    float acc[R * N];
    for (int64_t block = first; block < last; ++block) {
      rows<W, R, N>(xw, xfp, in, w, block * R, acc);
      finish(block * R, R, acc);
    }
  });
  float acc[N];
  for (int64_t row = blocks * R; row < out; ++row) {
    rows<W, 1, N>(xw, xfp, in, w, row, acc);
    finish(row, 1, acc);
  }
}

template <typename W>
void dispatch_rows(const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  switch (x.size(0)) {
    case 1: return run<W, 1>(x, weight, bias, y);
    case 2: return run<W, 2>(x, weight, bias, y);
    case 3: return run<W, 3>(x, weight, bias, y);
    default: return run<W, 4>(x, weight, bias, y);
  }
}

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows,
              "x must be [rows, in] with 1 to ", kMaxRows, " rows");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight must be [out, in] matching x's ", x.size(1), " input features");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share their dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "small_batch_linear takes float32 or bfloat16, not ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be [out] in x's dtype");
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const c10::optional<at::Tensor> bc =
      bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    dispatch_rows<float>(xc, wc, bc, y);
  } else {
    dispatch_rows<at::BFloat16>(xc, wc, bc, y);
  }
  return y;
}

// Any number of rows, each computed exactly as `small_batch_linear` computes it alone: every
// output element is one dot product of a weight row and an input row, summed in a fixed order
// that depends only on `in` (the same blocks, accumulator lanes and final reduction whatever
// the rows around it), so a row's result does not depend on how many rows share the call nor
// on where it sits among them. Rows are taken in tiles of kTileRows, four at a time against
// four weight rows (the R x N kernel above), the weights in chunks of kTileOut rows per tile so
// both stay in cache; output rows are split over torch's intra-op threads.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileOut = 128;
constexpr int64_t kPrefetchGroups = 2;

template <typename W, int R>
void rows_any(const W* xw, const float* xf, int64_t in, const W* w, int64_t row0, int64_t n0,
              int64_t n1, const W* b, W* yp, int64_t out) {
  float acc[R * kMaxRows];
  auto finish = [&](int64_t n_first, int n_count) {
    for (int r = 0; r < R; ++r) {
      const float add = b ? static_cast<float>(b[row0 + r]) : 0.0f;
      for (int n = 0; n < n_count; ++n)
        yp[(n_first + n) * out + row0 + r] = static_cast<W>(acc[r * n_count + n] + add);
    }
  };
  // The weight rows kPrefetchGroups calls ahead on their way into the cache while these are
  // used (a weight that does not fit in the cache streams from memory without stalls).
  if (row0 + (kPrefetchGroups + 1) * R <= out) {
    const char* next = reinterpret_cast<const char*>(w + (row0 + kPrefetchGroups * R) * in);
    const int64_t bytes = R * in * static_cast<int64_t>(sizeof(W));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(next + off, 0, 2);
  }
  int64_t n = n0;
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  // Four rows by four outputs in registers to the end: element 4n + r of the sums is output
  // (n, row0 + r), so the bias adds as one vector and each row's four outputs store at once.
  // The conversion rounds to nearest even as static_cast does; a tile holding a NaN or a
  // denormal (which the instruction rounds otherwise) takes the scalar path instead.
  if constexpr (std::is_same_v<W, at::BFloat16> && R == 4) {
    if (in % 32 == 0) {
      float bias4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (b)
        for (int r = 0; r < 4; ++r) bias4[r] = static_cast<float>(b[row0 + r]);
      const __m512 add = _mm512_broadcast_f32x4(_mm_loadu_ps(bias4));
      for (; n + 4 <= n1; n += 4) {
        const __m512 sums = _mm512_add_ps(dot_4x4_bf16(xw + n * in, in, w, row0), add);
        if (_mm512_fpclass_ps_mask(sums, 0xA1)) {  // QNaN, SNaN or denormal
          alignas(64) float d[16];
          _mm512_store_ps(d, sums);
          for (int m = 0; m < 4; ++m)
            for (int r = 0; r < 4; ++r) yp[(n + m) * out + row0 + r] = static_cast<W>(d[4 * m + r]);
          continue;
        }
        alignas(32) uint16_t h[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(h), (__m256i)_mm512_cvtneps_pbh(sums));
        for (int m = 0; m < 4; ++m) std::memcpy(yp + (n + m) * out + row0, h + 4 * m, 8);
      }
    }
  }
#endif
  for (; n + kMaxRows <= n1; n += kMaxRows) {
    rows<W, R, kMaxRows>(xw + n * in, xf ? xf + n * in : nullptr, in, w, row0, acc);
    finish(n, kMaxRows);
  }
  switch (n1 - n) {
    case 3: rows<W, R, 3>(xw + n * in, xf ? xf + n * in : nullptr, in, w, row0, acc); break;
    case 2: rows<W, R, 2>(xw + n * in, xf ? xf + n * in : nullptr, in, w, row0, acc); break;
    case 1: rows<W, R, 1>(xw + n * in, xf ? xf + n * in : nullptr, in, w, row0, acc); break;
    default: return;
  }
  finish(n, static_cast<int>(n1 - n));
}

template <typename W>
void run_any(const at::Tensor& x, const at::Tensor& weight,
             const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  constexpr int R = 4;
  const int64_t rows_x = x.size(0), in = weight.size(1), out = weight.size(0);
  const W* xw = x.data_ptr<W>();
  const bool widen = !(std::is_same_v<W, at::BFloat16> && kBf16Dot);
  const at::Tensor xf = widen ? x.to(at::kFloat).contiguous() : at::Tensor();
  const float* xfp = widen ? xf.data_ptr<float>() : nullptr;
  const W* w = weight.data_ptr<W>();
  const W* b = bias.has_value() ? bias->data_ptr<W>() : nullptr;
  W* yp = y.data_ptr<W>();
  // Work items: kTileOut weight rows (the last chunk takes the rows past a multiple of R one
  // at a time) by kTileRows input rows, a chunk's tiles in a row so that a thread going
  // through several keeps the chunk's weights in cache. Which thread computes an item does
  // not change its sums.
  const int64_t chunks = (out + kTileOut - 1) / kTileOut;
  const int64_t tiles = (rows_x + kTileRows - 1) / kTileRows;
  at::parallel_for(0, chunks * tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t chunk = item / tiles, tile = item % tiles;
      const int64_t o0 = chunk * kTileOut, o1 = std::min(out, o0 + kTileOut);
      const int64_t n0 = tile * kTileRows, n1 = std::min(rows_x, n0 + kTileRows);
      int64_t row = o0;
      for (; row + R <= o1; row += R) rows_any<W, R>(xw, xfp, in, w, row, n0, n1, b, yp, out);
      for (; row < o1; ++row) rows_any<W, 1>(xw, xfp, in, w, row, n0, n1, b, yp, out);
    }
  });
}

at::Tensor invariant_linear(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, in]");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight must be [out, in] matching x's ", x.size(1), " input features");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share their dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "invariant_linear takes float32 or bfloat16, not ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be [out] in x's dtype");
  }
  // Up to kMaxRows rows the small-batch kernel is the same computation, tuned for them.
  if (x.size(0) >= 1 && x.size(0) <= kMaxRows) return small_batch_linear(x, weight, bias);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const c10::optional<at::Tensor> bc =
      bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return y.zero_();
  if (x.scalar_type() == at::kFloat) {
    run_any<float>(xc, wc, bc, y);
  } else {
    run_any<at::BFloat16>(xc, wc, bc, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("small_batch_linear", &small_batch_linear);
  m.impl("invariant_linear", &invariant_linear);
}
