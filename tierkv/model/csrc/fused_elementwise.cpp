// The decoder's elementwise steps, one pass each: RMSNorm, SiLU(gate) * up, and the rotary
// embedding of queries and keys.
//
// In torch each is 4-8 ops, each reading and writing the whole activation (a 32-request x
// 1536-token prefill spent about a fifth of its time in them) and each costing a few
// microseconds of dispatch at a decode step's sizes. These compute the same values in one pass
// and, in bfloat16, round where torch's op sequence rounds, so they agree with it (and with
// transformers' modules) to the last bit but for the order of a row's sum of squares and the
// last bit of an exponential:
//
// * rms_norm: y = weight * dtype(x * rsqrt(mean(x^2) + eps)), statistics in float32;
// * silu_and_mul: for [N, 2I] = (gate | up), dtype(dtype(silu(gate)) * up);
// * rotary: x * cos + rotate_half(x) * sin, each product rounded to dtype, then the sum.
//
// float32 and bfloat16 (the engine's dtypes on CPU); tierkv/model/layers.py keeps torch's ops
// for float16 and where the extension is missing.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "simd.h"  // tierkv/csrc, on the include path

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace {

using tierkv_simd::broadcast;
using tierkv_simd::exp_nonpositive;
using tierkv_simd::f32x16;
using tierkv_simd::hsum;
using tierkv_simd::load;
using tierkv_simd::store;

constexpr int64_t kLanes = 16;

// The rounding a store of T applies, keeping the values as floats.
template <typename T>
inline f32x16 round_to(f32x16 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return tierkv_simd::round_bf16(v);
  }
}

// out[i .. i + 16) = body(the `inputs` arrays' vectors at i) for i in [0, n) by 16: whole
// vectors in place, the tail through zero-padded copies (every element takes the same path).
template <typename T, typename Body>
inline void vectors(int64_t n, const T* const* in, int inputs, T* out, Body body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    f32x16 x[4];
    for (int k = 0; k < inputs; ++k) x[k] = load(in[k] + i);
    store(out + i, body(x));
  }
  if (i < n) {
    T pad[4][kLanes] = {};
    T result[kLanes];
    f32x16 x[4];
    for (int k = 0; k < inputs; ++k) {
      std::memcpy(pad[k], in[k] + i, sizeof(T) * (n - i));
      x[k] = load(pad[k]);
    }
    store(result, body(x));
    std::memcpy(out + i, result, sizeof(T) * (n - i));
  }
}

// Rows at least this many elements per task: below, the threads' start costs more.
constexpr int64_t kGrain = 1 << 14;

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y) {
  const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / dim), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* row = xp + r * dim;
      f32x16 squares{};
      const T* src[2] = {row, wp};
      int64_t i = 0;
      for (; i + kLanes <= dim; i += kLanes) {
        const f32x16 v = load(row + i);
        squares += v * v;
      }
      float sum = hsum(squares);
      for (; i < dim; ++i) sum += static_cast<float>(row[i]) * static_cast<float>(row[i]);
      const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
      const f32x16 s = broadcast(scale);
      vectors<T>(dim, src, 2, yp + r * dim, [s](const f32x16* v) {
        return v[1] * round_to<T>(v[0] * s);
      });
    }
  });
}

template <typename T>
void silu_and_mul_rows(const at::Tensor& x, at::Tensor& y) {
  const int64_t half = x.size(-1) / 2, rows = x.numel() / std::max<int64_t>(2 * half, 1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / half), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* src[2] = {xp + r * 2 * half, xp + r * 2 * half + half};
      vectors<T>(half, src, 2, yp + r * half, [](const f32x16* v) {
        // sigmoid(g) from exp(-|g|) <= 1: 1 / (1 + e) for g >= 0, e / (1 + e) below.
        const f32x16 g = v[0];
        const f32x16 e = exp_nonpositive(g < 0.0f ? g : -g);
        const f32x16 sigmoid = (g < 0.0f ? e : broadcast(1.0f)) / (1.0f + e);
        return round_to<T>(g * sigmoid) * v[1];
      });
    }
  });
}

// One [N, H, D] tensor rotated by cos/sin [N, 1, D] (token stride of x arbitrary, heads and
// channels contiguous) into y [N, H, D] contiguous.
template <typename T>
void rotary_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 at::Tensor& y) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t per_token = heads * dim;
  at::parallel_for(0, tokens, std::max<int64_t>(1, kGrain / per_token), [&](int64_t first,
                                                                          int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const T* c = cp + t * cos.stride(0);
      const T* s = sp + t * sin.stride(0);
      for (int64_t h = 0; h < heads; ++h) {
        const T* row = xp + t * x.stride(0) + h * dim;
        T* out = yp + (t * heads + h) * dim;
        // First half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin.
        const T* lo_in[4] = {row, row + half, c, s};
        const T* hi_in[4] = {row + half, row, c + half, s + half};
        for (int part = 0; part < 2; ++part) {
          const T* const* in = part == 0 ? lo_in : hi_in;
          const float sign = part == 0 ? -1.0f : 1.0f;
          T* dst = out + part * half;
          vectors<T>(half, in, 4, dst, [sign](const f32x16* v) {
            return round_to<T>(v[0] * v[2]) + round_to<T>(sign * v[1] * v[3]);
          });
        }
      }
    }
  });
}

void check_dtype(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              " takes float32 or bfloat16, not ", x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_dtype(x, "rms_norm");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be [", x.size(-1), "] in x's dtype");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(xc, wc, eps, y);
  } else {
    rms_norm_rows<at::BFloat16>(xc, wc, eps, y);
  }
  return y;
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_dtype(x, "silu_and_mul");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "the last dim must be gate and up halves");
  const at::Tensor xc = x.contiguous();
  auto sizes = xc.sizes().vec();
  sizes.back() /= 2;
  at::Tensor y = at::empty(sizes, xc.options());
  if (x.scalar_type() == at::kFloat) {
    silu_and_mul_rows<float>(xc, y);
  } else {
    silu_and_mul_rows<at::BFloat16>(xc, y);
  }
  return y;
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x must be [N, H, D] with D even");
  at::Tensor xc = x;
  if (x.stride(2) != 1 || x.stride(1) != x.size(2)) xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) {
    rotary_rows<float>(xc, cos, sin, y);
  } else {
    rotary_rows<at::BFloat16>(xc, cos, sin, y);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin) {
  check_dtype(q, "rotary");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && cos.scalar_type() == q.scalar_type() &&
                  sin.scalar_type() == q.scalar_type(),
              "q, k, cos and sin must share their dtype");
  TORCH_CHECK(k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "k must be [N, Hkv, D] beside q [N, Hq, D]");
  const at::Tensor cc = cos.reshape({q.size(0), q.size(2)}).contiguous();
  const at::Tensor sc = sin.reshape({q.size(0), q.size(2)}).contiguous();
  return {rotate(q, cc, sc), rotate(k, cc, sc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
}
