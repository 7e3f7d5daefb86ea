// Causal flash attention of a bfloat16 prefill chunk, in bf16 dot products.
//
// A prefill chunk's attention is most of a long prompt's time, and torch's CPU flash kernel
// (behind scaled_dot_product_attention) reaches about 65 GFLOP/s on one core of this project's
// reference CPU, where a bfloat16 matrix product of the same sizes reaches 430. This kernel
// computes the two products of each tile with the bf16 dot-product instruction (vdpbf16ps:
// exact products of bf16 pairs, float32 sums), as a matrix product does:
//
// * each KV head's keys are first repacked so that 64 keys' copies of one pair of channels fill
//   a register (logits: 4 query rows x 64 keys per step), and its values so that one pair of
//   keys' copies of 16 channels do (output: 4 query rows x 64 channels per step);
// * one work item per (query head, tile of 64 queries), spread over torch's threads; the query
//   heads of a KV head (GQA) read the same packed keys;
// * an online softmax in float32 per row: each 64-key block's maximum rescales the running
//   output and sum; the probabilities are rounded to bf16 for the second product (as GPU flash
//   kernels and torch's CPU kernel do);
// * visibility is a band per query: query i sees key j iff j <= i + shift and, under a sliding
//   window W, j > i + shift - W. Blocks outside every row's band are skipped and blocks inside
//   all of them are not masked, so causal attention costs about half the full square.
//
// It returns the log-sum-exp of each row beside the output, so that a caller can merge it with
// attention over other tokens (tierkv/kv/backends/partial.py). Without AVX512-BF16 at compile time
// flash_prefill_supported() is false and the engine keeps torch's kernel.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX512BF16__

using tierkv_simd::exp_nonpositive;
using tierkv_simd::load;

constexpr int64_t kTile = 64;   // queries per work item
constexpr int64_t kBlock = 64;  // keys per softmax block
constexpr int64_t kRows = 4;    // query rows per microkernel step

inline uint32_t word(const at::BFloat16* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// Keys of one KV head as [block][channel pair][64 keys] words, values as [key pair][channel]
// words (the two keys' bf16 in the low and high half), into zeroed buffers (zero past the last
// key).
void pack_keys(const at::BFloat16* k, int64_t key_stride, int64_t keys, int64_t dim,
               uint32_t* kp) {
  const int64_t pairs = dim / 2;
  for (int64_t j = 0; j < keys; ++j) {
    uint32_t* block = kp + (j / kBlock) * pairs * kBlock + j % kBlock;
    for (int64_t p = 0; p < pairs; ++p) block[p * kBlock] = word(k + j * key_stride + 2 * p);
  }
}

void pack_head(const at::BFloat16* k, const at::BFloat16* v, int64_t key_stride,
               int64_t value_stride, int64_t keys, int64_t dim, uint32_t* kp, uint32_t* vp) {
  pack_keys(k, key_stride, keys, dim, kp);
  for (int64_t j = 0; j < keys; ++j) {
    uint16_t* row = reinterpret_cast<uint16_t*>(vp + (j / 2) * dim) + j % 2;
    const uint16_t* src = reinterpret_cast<const uint16_t*>(v + j * value_stride);
    for (int64_t d = 0; d < dim; ++d) row[2 * d] = src[d];
  }
}

// logits[r][c] = q[r] . key c for kRows query rows (words [kRows][pairs]) and one block.
inline void logits_step(const uint32_t* q, int64_t pairs, const uint32_t* kb, float* logits) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[4];
    for (int c = 0; c < 4; ++c) b[c] = (__m512bh)_mm512_loadu_si512(kb + p * kBlock + c * 16);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * pairs + p]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(logits + r * kBlock + c * 16, acc[r][c]);
}

// out[r][d0 .. d0 + 16 C) += probs[r] . values for kRows rows; `probs` rows are kBlock bf16.
template <int C>
inline void values_step(const at::BFloat16* probs, const uint32_t* vb, int64_t dim, int64_t d0,
                        float* out) {
  __m512 acc[kRows][C];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_loadu_ps(out + r * dim + d0 + c * 16);
  for (int64_t t = 0; t < kBlock / 2; ++t) {
    __m512bh b[C];
    for (int c = 0; c < C; ++c) b[c] = (__m512bh)_mm512_loadu_si512(vb + t * dim + d0 + c * 16);
    for (int r = 0; r < kRows; ++r) {
      const int pair = static_cast<int>(word(probs + r * kBlock + 2 * t));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * dim + d0 + c * 16, acc[r][c]);
}

// values_step over all `dim` channels: 64 at a time, then a 32 and a 16 wide tail.
inline void values_steps(const at::BFloat16* probs, const uint32_t* vb, int64_t dim,
                         float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= dim; d0 += 64) values_step<4>(probs, vb, dim, d0, out);
  if (d0 + 32 <= dim) {
    values_step<2>(probs, vb, dim, d0, out);
    d0 += 32;
  }
  if (d0 < dim) values_step<1>(probs, vb, dim, d0, out);
}

// Query i sees keys first(i) ..= last(i).
struct Band {
  int64_t shift, window;  // window 0: none
  int64_t first(int64_t i) const {
    return window ? std::max<int64_t>(0, i + shift - window + 1) : 0;
  }
  int64_t last(int64_t i, int64_t keys) const { return std::min(keys - 1, i + shift); }
};

// One tile: queries [i0, i0 + rows) of query head `h` over its KV head's packed keys/values.
void tile(const at::Tensor& q, int64_t h, int64_t i0, int64_t rows, const uint32_t* kp,
          const uint32_t* vp, int64_t keys, const Band& band, float scale, at::BFloat16* out,
          float* lse, const at::BFloat16* init_out, const float* init_lse) {
  const int64_t dim = q.size(2), pairs = dim / 2, heads = q.size(0);
  const int64_t padded = (rows + kRows - 1) / kRows * kRows;
  std::vector<uint32_t> qw(padded * pairs, 0);
  std::vector<float> acc(padded * dim, 0.0f), logits(kRows * kBlock);
  std::vector<at::BFloat16> probs(padded * kBlock);
  std::vector<float> row_max(padded, -std::numeric_limits<float>::infinity());
  std::vector<float> row_sum(padded, 0.0f);
  const at::BFloat16* qbase = q.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < rows; ++r) {
    const at::BFloat16* src = qbase + h * q.stride(0) + (i0 + r) * q.stride(1);
    for (int64_t p = 0; p < pairs; ++p) qw[r * pairs + p] = word(src + 2 * p);
  }
  if (init_lse != nullptr) {
    // Continue a softmax over other keys: its normalised output with sum 1 at its
    // log-sum-exp is the same running state as its unnormalised one.
    for (int64_t r = 0; r < rows; ++r) {
      const float l = init_lse[h * q.size(1) + i0 + r];
      if (!std::isfinite(l)) continue;  // it saw nothing: start empty
      row_max[r] = l;
      row_sum[r] = 1.0f;
      const at::BFloat16* src = init_out + ((i0 + r) * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) acc[r * dim + d] = static_cast<float>(src[d]);
    }
  }
  const int64_t lo = band.first(i0), hi = band.last(i0 + rows - 1, keys);
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t b0 = lo / kBlock * kBlock; b0 <= hi; b0 += kBlock) {
    const uint32_t* kb = kp + (b0 / kBlock) * pairs * kBlock;
    const uint32_t* vb = vp + (b0 / 2) * dim;
    // Every row sees the whole block: no mask.
    const bool whole =
        b0 >= band.first(i0 + padded - 1) && b0 + kBlock - 1 <= band.last(i0, keys);
    for (int64_t r0 = 0; r0 < padded; r0 += kRows) {
      logits_step(qw.data() + r0 * pairs, pairs, kb, logits.data());
      for (int64_t r = r0; r < r0 + kRows; ++r) {
        const float* row = logits.data() + (r - r0) * kBlock;
        at::BFloat16* prow = probs.data() + r * kBlock;
        const int64_t first = band.first(i0 + r) - b0, last = band.last(i0 + r, keys) - b0;
        if (!whole && (last < std::max<int64_t>(first, 0) || first >= kBlock)) {
          std::memset(prow, 0, sizeof(at::BFloat16) * kBlock);
          continue;
        }
        __m512 s[4];
        __mmask16 seen[4];
        __m512 block_max = neg_inf;
        for (int c = 0; c < 4; ++c) {
          s[c] = _mm512_mul_ps(_mm512_loadu_ps(row + c * 16), scale_v);
          seen[c] = 0xFFFF;
          if (!whole) {
            const __m512 j = _mm512_add_ps(iota, _mm512_set1_ps(static_cast<float>(c * 16)));
            const __m512 from = _mm512_set1_ps(static_cast<float>(first));
            const __m512 to = _mm512_set1_ps(static_cast<float>(last));
            seen[c] =
                _mm512_cmp_ps_mask(j, from, _CMP_GE_OQ) & _mm512_cmp_ps_mask(j, to, _CMP_LE_OQ);
          }
          block_max = _mm512_mask_max_ps(block_max, seen[c], block_max, s[c]);
        }
        const float old_max = row_max[r];
        const float new_max = std::max(old_max, _mm512_reduce_max_ps(block_max));
        const __m512 m = _mm512_set1_ps(new_max);
        __m512 total = _mm512_setzero_ps();
        for (int c = 0; c < 4; ++c) {
          // Unseen lanes may exceed the maximum; the mask drops their exponentials.
          const __m512 e = exp_nonpositive(_mm512_sub_ps(s[c], m));
          const __m512 p = _mm512_maskz_mov_ps(seen[c], e);
          total = _mm512_add_ps(total, p);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + c * 16),
                              (__m256i)_mm512_cvtneps_pbh(p));
        }
        const float alpha = std::exp(old_max - new_max);  // 0 while nothing was seen
        row_sum[r] = row_sum[r] * alpha + _mm512_reduce_add_ps(total);
        row_max[r] = new_max;
        if (alpha != 1.0f) {
          float* o = acc.data() + r * dim;
          const __m512 a = _mm512_set1_ps(alpha);
          for (int64_t d = 0; d < dim; d += 16)
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), a));
        }
      }
      values_steps(probs.data() + r0 * kBlock, vb, dim, acc.data() + r0 * dim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    at::BFloat16* dst = out + ((i0 + r) * heads + h) * dim;
    const float inv = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
    for (int64_t d = 0; d < dim; d += 16)
      tierkv_simd::store(dst + d, load(&acc[r * dim + d]) * inv);
    lse[h * q.size(1) + i0 + r] = row_sum[r] > 0.0f
                                      ? row_max[r] + std::log(row_sum[r])
                                      : -std::numeric_limits<float>::infinity();
  }
}

#endif  // __AVX512BF16__

bool flash_prefill_supported() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// q [Hq, n, D], k/v [H, T, D] bfloat16 (channels contiguous, H dividing Hq), D a multiple of
// 16. Returns out [n, Hq, D] bfloat16 and lse [Hq, n] float32 (-inf for a query seeing no key).
// With init_out [n, Hq, D] bfloat16 and init_lse [Hq, n] (a previous call's results over other
// keys), the softmax continues from them: the result is attention over both sets of keys, as
// merging the two calls' results by their log-sum-exps would give, without the merge.
std::tuple<at::Tensor, at::Tensor> flash_prefill(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, int64_t shift,
                                                 int64_t window, double sm_scale,
                                                 const std::optional<at::Tensor>& init_out,
                                                 const std::optional<at::Tensor>& init_lse) {
  TORCH_CHECK(flash_prefill_supported(), "flash_prefill needs a build with AVX512-BF16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k and v must be 3-d");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "flash_prefill takes bfloat16 q, k and v");
  const int64_t heads = q.size(0), n = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(0), keys = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == dim, "k and v must be [H, T, ", dim, "]");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "KV heads must divide query heads");
  TORCH_CHECK(dim > 0 && dim % 16 == 0, "head dim must be a multiple of 16, got ", dim);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "channels must be contiguous");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(init_out.has_value() == init_lse.has_value(), "init_out and init_lse go together");
  const at::BFloat16* init_outp = nullptr;
  const float* init_lsep = nullptr;
  if (init_lse.has_value()) {
    TORCH_CHECK(init_out->scalar_type() == at::kBFloat16 && init_out->is_contiguous() &&
                    init_out->sizes() == at::IntArrayRef({n, heads, dim}),
                "init_out must be a contiguous bfloat16 [n, Hq, D]");
    TORCH_CHECK(init_lse->scalar_type() == at::kFloat && init_lse->is_contiguous() &&
                    init_lse->sizes() == at::IntArrayRef({heads, n}),
                "init_lse must be a contiguous float32 [Hq, n]");
    init_outp = init_out->data_ptr<at::BFloat16>();
    init_lsep = init_lse->data_ptr<float>();
  }
  at::Tensor out = at::empty({n, heads, dim}, q.options());
  at::Tensor lse = at::empty({heads, n}, q.options().dtype(at::kFloat));
#ifdef __AVX512BF16__
  if (n == 0) return {out, lse};
  const int64_t blocks = std::max<int64_t>(1, (keys + kBlock - 1) / kBlock);
  const int64_t kwords = blocks * dim / 2 * kBlock, vwords = blocks * kBlock / 2 * dim;
  std::vector<uint32_t> kp(kv_heads * kwords), vp(kv_heads * vwords);
  const at::BFloat16* kbase = k.data_ptr<at::BFloat16>();
  const at::BFloat16* vbase = v.data_ptr<at::BFloat16>();
  at::parallel_for(0, kv_heads, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g)
      pack_head(kbase + g * k.stride(0), vbase + g * v.stride(0), k.stride(1), v.stride(1), keys,
                dim, kp.data() + g * kwords, vp.data() + g * vwords);
  });
  const Band band{shift, window};
  const int64_t tiles = (n + kTile - 1) / kTile, group = heads / kv_heads;
  at::BFloat16* outp = out.data_ptr<at::BFloat16>();
  float* lsep = lse.data_ptr<float>();
  const float scale = static_cast<float>(sm_scale);
  at::parallel_for(0, heads * tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t h = item / tiles, i0 = (item % tiles) * kTile, g = h / group;
      tile(q, h, i0, std::min(kTile, n - i0), kp.data() + g * kwords, vp.data() + g * vwords,
           keys, band, scale, outp, lsep, init_outp, init_lsep);
    }
  });
#endif
  return {out, lse};
}

// Column sums of a few query rows' attention probabilities over one part of what they see:
// sums[h][j] = sum over rows i of exp(q[h][i] . k[j] * sm_scale - lse[h][i]) for the keys j row
// i sees (flash_prefill's band: j <= i + shift and, with a window W, j > i + shift - W), where
// lse[h][i] is the row's log-sum-exp over everything it attends (this part and any other): the
// probability mass each key receives from the rows, which a tiered slot's prefill scores
// tokens by. The logits are flash_prefill's (bf16 pair products, float32 sums), so the
// probabilities agree with the attention's own. q [Hq, m, D], k [H, T, D] bfloat16 (channels
// contiguous, H dividing Hq), lse [Hq, m] float32. Returns [Hq, T] float32.
at::Tensor flash_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                        int64_t shift, int64_t window, double sm_scale) {
  TORCH_CHECK(flash_prefill_supported(), "flash_scores needs a build with AVX512-BF16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be 3-d");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16,
              "flash_scores takes bfloat16 q and k");
  const int64_t heads = q.size(0), m = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(0), keys = k.size(1);
  TORCH_CHECK(k.size(2) == dim && kv_heads > 0 && heads % kv_heads == 0,
              "k must be [H, T, ", dim, "] with H dividing the query heads");
  TORCH_CHECK(dim > 0 && dim % 16 == 0, "head dim must be a multiple of 16, got ", dim);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "channels must be contiguous");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({heads, m}),
              "lse must be float32 [Hq, m]");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  const int64_t blocks = std::max<int64_t>(1, (keys + kBlock - 1) / kBlock);
  at::Tensor sums = at::zeros({heads, blocks * kBlock}, q.options().dtype(at::kFloat));
#ifdef __AVX512BF16__
  if (m == 0 || keys == 0) return sums.narrow(1, 0, keys);
  const int64_t pairs = dim / 2, kwords = blocks * pairs * kBlock;
  std::vector<uint32_t> kp(kv_heads * kwords, 0);
  const at::BFloat16* kbase = k.data_ptr<at::BFloat16>();
  at::parallel_for(0, kv_heads, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g)
      pack_keys(kbase + g * k.stride(0), k.stride(1), keys, dim, kp.data() + g * kwords);
  });
  const at::Tensor lse_c = lse.contiguous();
  const float* lsep = lse_c.data_ptr<float>();
  const at::BFloat16* qbase = q.data_ptr<at::BFloat16>();
  float* sump = sums.data_ptr<float>();
  const Band band{shift, window};
  const int64_t group = heads / kv_heads, padded = (m + kRows - 1) / kRows * kRows;
  const float scale = static_cast<float>(sm_scale);
  at::parallel_for(0, heads, 1, [&](int64_t first_head, int64_t last_head) {
    std::vector<uint32_t> qw(padded * pairs, 0);
    std::vector<float> logits(kRows * kBlock);
    for (int64_t h = first_head; h < last_head; ++h) {
      const uint32_t* kh = kp.data() + (h / group) * kwords;
      for (int64_t r = 0; r < m; ++r) {
        const at::BFloat16* src = qbase + h * q.stride(0) + r * q.stride(1);
        for (int64_t p = 0; p < pairs; ++p) qw[r * pairs + p] = word(src + 2 * p);
      }
      float* out = sump + h * blocks * kBlock;
      for (int64_t r0 = 0; r0 < m; r0 += kRows) {
        const int64_t rows = std::min(kRows, m - r0);
        const int64_t lo = band.first(r0), hi = band.last(r0 + rows - 1, keys);
        for (int64_t b0 = lo / kBlock * kBlock; b0 <= hi; b0 += kBlock) {
          logits_step(qw.data() + r0 * pairs, pairs, kh + (b0 / kBlock) * pairs * kBlock,
                      logits.data());
          for (int64_t r = r0; r < r0 + rows; ++r) {
            const int64_t first = band.first(r) - b0, last = band.last(r, keys) - b0;
            if (last < std::max<int64_t>(first, 0) || first >= kBlock) continue;
            const float row_lse = lsep[h * m + r];
            if (!std::isfinite(row_lse)) continue;  // a row that saw nothing adds nothing
            const __m512 scale_v = _mm512_set1_ps(scale), lse_v = _mm512_set1_ps(row_lse);
            for (int c = 0; c < 4; ++c) {
              const __m512 j = _mm512_add_ps(
                  _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                  _mm512_set1_ps(static_cast<float>(c * 16)));
              const __mmask16 seen =
                  _mm512_cmp_ps_mask(j, _mm512_set1_ps(static_cast<float>(first)), _CMP_GE_OQ) &
                  _mm512_cmp_ps_mask(j, _mm512_set1_ps(static_cast<float>(last)), _CMP_LE_OQ);
              const __m512 s = _mm512_sub_ps(
                  _mm512_mul_ps(_mm512_loadu_ps(logits.data() + (r - r0) * kBlock + c * 16),
                                scale_v),
                  lse_v);
              const __m512 p = _mm512_maskz_mov_ps(seen, exp_nonpositive(s));
              float* dst = out + b0 + c * 16;
              _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), p));
            }
          }
        }
      }
    }
  });
#endif
  return sums.narrow(1, 0, keys);
}

}  // namespace

TORCH_LIBRARY_IMPL(tierkv, CatchAll, m) {
  m.impl("flash_prefill_supported", &flash_prefill_supported);
}

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("flash_prefill", &flash_prefill);
  m.impl("flash_scores", &flash_scores);
}
