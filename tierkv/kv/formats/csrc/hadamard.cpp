// The rotated basis of quantized KV formats (tierkv/kv/formats/rotation.py) as a fast
// Walsh-Hadamard transform instead of a matrix product.
//
// The rotation M is block-diagonal: the same b x b Sylvester Hadamard matrix H (entries +-1, b
// the largest power of two dividing the head dim) on every block, times seeded column signs s.
// Its three uses are then
//   keys and values   x M       = H(x) * s
//   queries           x M / b   = H(x) * s / b
//   attention output  o M^T / b = H(o * s) / b
// and H(x) takes log2(b) butterfly stages (a + c, a - c) instead of b multiply-adds per
// element. As a product through invariant_linear the rotation ran at about 180 GFLOP/s on a
// 2,048-token chunk of SmolLM2's queries (0.83 ms a layer) and cost four op calls a layer in a
// decode step; here each row is 16-lane vectors: the stages within a vector are a permute and
// an add or subtract by lane, the others add and subtract whole vectors.
//
// Every sum is taken in float32 and rounded once to the output dtype (float32 or bfloat16):
// sums of +-x in another order than the product's, so a bfloat16 result is the product's but
// for a rare last-bit tie. A row's result depends on the row alone (batch invariance).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "simd.h"  // tierkv/csrc, on the include path

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using tierkv_simd::f32x16;
using tierkv_simd::i32x16;
using tierkv_simd::load;
using tierkv_simd::store;

constexpr int64_t kLanes = 16;

// One butterfly stage of span h < 16 inside a vector: lane l pairs with lane l ^ h; the lower
// lane of a pair takes a + c, the upper c' = a - c (its partner minus itself).
inline f32x16 stage_in_vector(f32x16 v, int h) {
  const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const i32x16 partner = lane ^ h;
#if defined(__clang__)
  f32x16 p;
  for (int l = 0; l < kLanes; ++l) p[l] = v[partner[l]];
#else
  const f32x16 p = __builtin_shuffle(v, partner);
#endif
  return (lane & h) != 0 ? p - v : v + p;
}

// The butterfly stages (a + c, a - c) of spans 1, 2, 4, ... up to n / 2 over n elements in
// place: whole vectors (the stages across a row's vectors) or single floats (any block size).
template <typename T>
inline void butterflies(T* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const T a = x[j], c = x[j + h];
        x[j] = a + c;
        x[j + h] = a - c;
      }
    }
  }
}

// H(x) over one block of b floats in place (b a power of two, at least 16), as vectors.
inline void fwht_vectors(f32x16* v, int64_t b) {
  const int64_t n = b / kLanes;
  for (int64_t i = 0; i < n; ++i) {
    for (int h = 1; h < kLanes; h *= 2) v[i] = stage_in_vector(v[i], h);
  }
  butterflies(v, n);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Rows whose blocks are whole vectors (b >= 16): loaded, signed, transformed, scaled and
// stored (rounded to bfloat16 as torch rounds) a vector at a time; the signs and the scale are
// one vector per 16 channels, `pre` applied before the transform and `post` after.
template <typename T>
void rotate_vector_rows(const T* x, T* y, const std::vector<f32x16>& pre,
                        const std::vector<f32x16>& post, int64_t rows, int64_t dim, int64_t b) {
  const int64_t n = dim / kLanes;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<f32x16> v(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < n; ++i) v[i] = load(x + r * dim + i * kLanes) * pre[i];
      for (int64_t block = 0; block < n; block += b / kLanes) fwht_vectors(v.data() + block, b);
      for (int64_t i = 0; i < n; ++i) store(y + r * dim + i * kLanes, v[i] * post[i]);
    }
  });
}

// Any block size (b < 16: head dims with an odd multiple of 8 or less), element by element.
template <typename T>
void rotate_scalar_rows(const T* x, T* y, const std::vector<float>& pre,
                        const std::vector<float>& post, int64_t rows, int64_t dim, int64_t b) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(dim));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t d = 0; d < dim; ++d) buf[d] = to_float(x[r * dim + d]) * pre[d];
      for (int64_t block = 0; block < dim; block += b) butterflies(buf.data() + block, b);
      for (int64_t d = 0; d < dim; ++d) y[r * dim + d] = static_cast<T>(buf[d] * post[d]);
    }
  });
}

template <typename T>
void rotate_rows(const T* x, T* y, const float* signs, int64_t rows, int64_t dim, int64_t b,
                 float scale, bool signs_first) {
  // x M = H(x) s (times the scale), o M^T = H(o s): the signs go before or after H.
  std::vector<float> pre(static_cast<size_t>(dim)), post(static_cast<size_t>(dim));
  for (int64_t d = 0; d < dim; ++d) {
    pre[d] = signs_first ? signs[d] : 1.0f;
    post[d] = (signs_first ? 1.0f : signs[d]) * scale;
  }
  if (b % kLanes != 0) {
    rotate_scalar_rows(x, y, pre, post, rows, dim, b);
    return;
  }
  std::vector<f32x16> pre_v(static_cast<size_t>(dim / kLanes)), post_v(pre_v.size());
  for (int64_t i = 0; i < dim / kLanes; ++i) {
    pre_v[i] = load(pre.data() + i * kLanes);
    post_v[i] = load(post.data() + i * kLanes);
  }
  rotate_vector_rows(x, y, pre_v, post_v, rows, dim, b);
}

// torch.ops.tierkv.hadamard: x [..., D] (float32 or bfloat16) through H with the column signs
// `signs` [D] (+-1, float32) before (signs_first) or after the transform, times `scale`.
at::Tensor hadamard(const at::Tensor& x, const at::Tensor& signs, double scale,
                    bool signs_first) {
  TORCH_CHECK(x.device().is_cpu() && signs.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "hadamard: float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "hadamard: x must be [..., D]");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(signs.scalar_type() == at::kFloat && signs.dim() == 1 && signs.size(0) == dim,
              "hadamard: signs must be float32 [", dim, "]");
  const int64_t b = dim & -dim;  // the largest power of two dividing dim
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = signs.contiguous();
  auto y = at::empty_like(xc);
  const int64_t rows = xc.numel() / dim;
  if (xc.scalar_type() == at::kFloat) {
    rotate_rows<float>(xc.data_ptr<float>(), y.data_ptr<float>(), sc.data_ptr<float>(), rows,
                       dim, b, static_cast<float>(scale), signs_first);
  } else {
    rotate_rows<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                               sc.data_ptr<float>(), rows, dim, b, static_cast<float>(scale),
                               signs_first);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("hadamard", &hadamard);
}
