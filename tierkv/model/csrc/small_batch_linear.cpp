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

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "../../kv/csrc/simd.h"

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
// The same for bfloat16 weights and inputs (`xb`, [N, in]) with the bf16 dot-product
// instruction, 32 channels per step.
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
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      float s = _mm512_reduce_add_ps(sums[r][n]);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierkv, m) {
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("small_batch_linear", &small_batch_linear);
}
