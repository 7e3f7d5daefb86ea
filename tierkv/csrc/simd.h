// 16-lane float arithmetic shared by the native kernels: GCC/Clang vector extensions (explicit
// SIMD without intrinsics, so one source serves every instruction set the compiler targets:
// one AVX-512 register with -march=native, split by the compiler on narrower machines), an
// exponential for non-positive inputs, float loads, a lane sum, and bfloat16 loads and stores.

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace tierkv_simd {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

// x in every lane: x - 0 is x for every x, so this is a splat, where f32x16{} + x is a scalar
// add of 0 first (-0 + 0 is +0).
inline f32x16 broadcast(float x) {
  return x - f32x16{};
}

// exp(x) for x <= 0 on 16 lanes, in plain arithmetic: x = n ln2 + r with |r| <= ln2 / 2 (n
// rounded to nearest by adding and subtracting 1.5 * 2^23), exp(r) by its Taylor series to
// degree 7 (relative error below 1e-8), and 2^n built in the exponent bits. Inputs below -87
// (masked tokens' -inf among them) give 0.
inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 c = x < -87.0f ? broadcast(-87.0f) : x;
  const f32x16 n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  f32x16 r = c - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  f32x16 p = broadcast(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? f32x16{} : p * two_n;
}

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of the 16 lanes (halves added first, then the 8 lanes in order).
inline float hsum(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  f32x8 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  lo += hi;
  float sum = 0.0f;
  for (int l = 0; l < 8; ++l) sum += lo[l];
  return sum;
}

// 16 bfloat16 values widened to float (a bfloat16 is the top half of a float32).
inline f32x16 load_bf16(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// The bfloat16 bits (in the high half, low half zero) of 16 floats rounded as torch rounds
// them: to nearest, ties to even, NaN to the quiet NaN 0x7FC0.
inline u32x16 bf16_bits(f32x16 v) {
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof bits);
  const u32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u + u32x16{} : rounded;
}

// 16 floats rounded to bfloat16 values, kept as floats.
inline f32x16 round_bf16(f32x16 v) {
  const u32x16 bits = bf16_bits(v);
  f32x16 out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// 16 floats rounded to bfloat16 and stored.
inline void store_bf16(uint16_t* p, f32x16 v) {
  const u16x16 h = __builtin_convertvector(bf16_bits(v) >> 16, u16x16);
  std::memcpy(p, &h, sizeof h);
}

// The same loads and stores by element type, for kernels templated on it.
inline f32x16 load(const c10::BFloat16* p) {
  return load_bf16(reinterpret_cast<const uint16_t*>(p));
}
inline void store(float* p, f32x16 v) {
  std::memcpy(p, &v, sizeof v);
}
inline void store(c10::BFloat16* p, f32x16 v) {
  store_bf16(reinterpret_cast<uint16_t*>(p), v);
}

}  // namespace tierkv_simd
