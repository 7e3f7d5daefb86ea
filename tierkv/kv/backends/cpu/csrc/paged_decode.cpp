// Decode attention (one query token per request) straight over tierkv's paged, quantized KV
// store. See tierkv/kv/backends/cpu/ops.py for the contract; this file is the kernel.
//
// One work item is one (request, KV head): its query heads (the GQA group) are processed
// together, so every key and value byte is read once. Pages are read in place from the arena
// through the page table, one block of up to kBlock tokens of one page at a time:
//   1. logits: each key's codes are unpacked 16 bytes at a time into float vectors in "plane
//      order" (plane p holds the codes at bit p * bits of every byte, so unpacking is a shift
//      and a mask, no shuffle), multiplied by their scales (one broadcast per chunk when a
//      group spans whole chunks, else one permute) and dotted with every query head, whose
//      channels were put in the same order once per work item; the zeros are dotted with each
//      head's sums over the groups' channels instead of being added lane by lane, and each
//      token's lane products are summed 16 tokens at a time (hsum16);
//   2. one online-softmax update per block: the block's maximum rescales the running sums
//      once, and the exponentials are taken over the block 16 lanes at a time;
//   3. values: chunk by chunk over the block's tokens, so each head's sums of a chunk stay in
//      registers, the codes scaled the same way and the zeros weighted by the probabilities
//      once per block and group; the plane order is undone once at the end.
// While a page is read, the next one is prefetched.
// Two optional extensions ride on the same loop:
//   * masking by stored position (tiered slots, whose tokens are in no particular order): a
//     token is visible iff pos <= query_pos and, under a sliding window, pos > query_pos -
//     window; blocks without a visible token are skipped, and each head's probability of
//     every token (relative to this part's log-sum-exp) can be written out. tiered_decode
//     runs it over both tiers of each (request, KV head), merges the two parts and adds the
//     probabilities to the tokens' stored scores in the same call;
//   * the residual ring (uniform slots): the newest `residual` positions of the range are read
//     from FULL-format ring pages (index pos % ring_size) after the quantized ones, their keys
//     and values converted to float32 rows in natural channel order, their values summed in a
//     second accumulator. Uncompressed slots are read as one ring covering their whole range
//     (tierkv/kv/backends/cpu/ops.py's decode_full), so these blocks span pages, sum their logits 16
//     tokens at a time and prefetch the next block's rows like the quantized ones.
// Everything is float32. SIMD is written with GCC/Clang vector extensions (16 floats, one
// AVX-512 register with -march=native, split by the compiler on narrower machines); the
// number of query heads per KV head is a template parameter for 1, 2, 4 and 8.
//
// Measured (demo shapes, k8v4, 1 thread, 2048 tokens, one layer): a first version written as
// plain loops for the auto-vectoriser (dequantize a token into a buffer, then dot products)
// took 66 ns per (token, KV head); GCC turned its short per-group loops into versioned
// vector loops and the u8 -> u32 widening into scalar code. The next version (per-lane scales
// and zeros permuted for every chunk of every token, one horizontal sum per token and head,
// scalar exponentials, no prefetch) took 27-45 ns. This one, per layer-call of
// scripts/bench_native_decode.py (batch x context, 2 KV heads, ms, before -> after, one run):
//   k8v4 32x1024 1.82 -> 0.84, 1x2048 0.096 -> 0.061; k8v8 2.40 -> 0.93, 0.102 -> 0.068;
//   k4v2 1.21 -> 0.70, 0.083 -> 0.052; k2v2 1.13 -> 0.74, 0.081 -> 0.055;
//   tiered k8v4/k4v2-g64 16x1024 0.85 -> 0.64;
// against 2.1 ms (32x1024) and 0.082 ms (1x2048) for SDPA over a contiguous bf16 cache. Half
// of the old large-batch time was cache misses at page starts, which the prefetch removed.
// Masking by position and writing the probabilities add about 20%; the ring's few dozen
// tokens cost a few microseconds per layer.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "simd.h"
#include "store_tables.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Tokens whose logits are computed before one online-softmax update.
constexpr int64_t kBlock = 64;
// Floats in one vector: a 512-bit register with -march=native on AVX-512, split by the
// compiler into narrower registers elsewhere. Codes are unpacked 16 bytes at a time.
constexpr int64_t kLanes = 16;

// GCC/Clang vector extensions (simd.h), and the narrower vectors codes are unpacked from.
using tierkv_simd::broadcast;
using tierkv_simd::exp_nonpositive;
using tierkv_simd::f32x16;
using tierkv_simd::hsum;
using tierkv_simd::i32x16;
using tierkv_simd::load;
using tierkv_simd::u16x16;
using tierkv_simd::u32x16;
typedef uint8_t u8x16 __attribute__((vector_size(16)));

// One per-token field of a page: where it starts in the page and how many bytes a token takes.
struct Field {
  int64_t offset;
  int64_t stride;
};

// Everything a work item needs to find and decode a token.
struct Layout {
  Field k_codes, k_scale, k_zero, v_codes, v_scale, v_zero;
  // int32 positions, read only by masked work items.
  Field pos;
  int64_t tokens_per_page;
  int64_t head_dim;
  int64_t groups;
  // Whether a 16-byte load at the last chunk of a token's codes stays inside the page (the
  // bytes past the row are then read and ignored instead of copied byte by byte).
  bool k_overread;
  bool v_overread;
};

// The stored dtype of FULL-format (ring) rows.
enum class RowType { kFloat, kBFloat16, kHalf };

// FULL-format pages of the residual ring: keys and values of a token in the stored dtype.
struct RingLayout {
  Field k, v;
  int64_t tokens_per_page;
  RowType type;
};

// What every work item of a call shares.
struct Shared {
  const Layout& lay;
  const RingLayout& ring;
  const uint8_t* arena;
  int64_t page_bytes;
  int64_t num_pages;
  int64_t group;  // query heads per KV head
  float sm_scale;
};

// One work item: a (request, KV head), its query heads and what they attend.
struct Item {
  const int64_t* pages;  // page ids of the quantized tokens
  int64_t start, end;    // token range [start, end)
  const float* q;        // [group, dim], natural channel order
  float* out;            // [group, dim]
  float* lse;            // [group]
  // Masking by stored position: visible iff pos <= query_pos && pos > query_pos - window
  // (no lower bound for window <= 0).
  bool masked;
  int64_t query_pos;
  int64_t window;
  // Each head's probability of each token, at probs + i * probs_stride + token (i < group),
  // for tokens [0, probs_width); null when not asked for.
  float* probs;
  int64_t probs_stride;
  int64_t probs_width;
  // The residual ring: positions [max(start, end - residual), end) are read from these FULL
  // pages, at index pos % ring_size, instead of the quantized pages.
  const int64_t* ring_pages;
  int64_t ring_size;
  int64_t residual;
  // The position column 0 of probs stands for (tiered_decode's ring part writes only its
  // own positions; 0 elsewhere).
  int64_t probs_base;
};

// A page's bytes, its id checked against the arena.
inline const uint8_t* page_base(const Shared& sh, int64_t page) {
  TORCH_CHECK(page >= 0 && page < sh.num_pages, "page id ", page, " outside the arena");
  return sh.arena + page * sh.page_bytes;
}

// The same for one value (a block's rescaling factor, a probability), from lane 0.
inline float exp_nonpositive(float x) {
  return exp_nonpositive(broadcast(x))[0];
}

// 16 bytes of codes as 16 integer lanes.
inline u32x16 widen(const uint8_t* p) {
#if defined(__AVX512F__)
  // GCC's generic u8 -> u32 vector conversion goes through scalar code: ask for vpmovzxbd.
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<u32x16>(_mm512_cvtepu8_epi32(bytes));
#else
  u32x16 w;
  for (int l = 0; l < kLanes; ++l) {
    w[l] = p[l];
  }
  return w;
#endif
}

// The codes row of a token, readable 16 bytes at a time: in place when the last chunk's load
// stays inside the page (bytes past the row are read and ignored), else copied to `pad`.
inline const uint8_t* code_row(const uint8_t* codes, int64_t nbytes, bool overread,
                               uint8_t* pad) {
  if (overread) {
    return codes;
  }
  std::memcpy(pad, codes, static_cast<size_t>(nbytes));
  return pad;
}

// Lane l takes element idx[l] of v (lane -> group of its byte).
inline f32x16 spread(f32x16 v, i32x16 idx) {
#if defined(__clang__)
  f32x16 out;
  for (int l = 0; l < kLanes; ++l) {
    out[l] = v[idx[l]];
  }
  return out;
#else
  return __builtin_shuffle(v, idx);
#endif
}

// Lane l takes lane idx[l] of the 32 lanes of a then b.
inline f32x16 shuffle2(f32x16 a, f32x16 b, i32x16 idx) {
#if defined(__clang__)
  f32x16 out;
  for (int l = 0; l < kLanes; ++l) {
    out[l] = idx[l] < kLanes ? a[idx[l]] : b[idx[l] - kLanes];
  }
  return out;
#else
  return __builtin_shuffle(a, b, idx);
#endif
}

// The lane sums of 16 vectors, lane t holding the sum of v[t]: four rounds, each adding the
// two halves of every token's lanes while pairing vectors up (2 shuffles and an add per pair:
// 45 operations, against about 10 for each of 16 separate horizontal sums).
inline f32x16 hsum16(const f32x16* v) {
  // Round r keeps 16 >> r lanes per token: lo takes each token's first half of them (of a,
  // then of b), hi the second half.
  static const i32x16 lo[4] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
      {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
      {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
      {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
  static const i32x16 hi[4] = {
      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
      {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
      {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
      {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
  f32x16 w[8];
  for (int j = 0; j < 8; ++j) {
    w[j] = shuffle2(v[2 * j], v[2 * j + 1], lo[0]) + shuffle2(v[2 * j], v[2 * j + 1], hi[0]);
  }
  for (int r = 1, pairs = 4; r < 4; ++r, pairs /= 2) {
    for (int j = 0; j < pairs; ++j) {
      w[j] = shuffle2(w[2 * j], w[2 * j + 1], lo[r]) + shuffle2(w[2 * j], w[2 * j + 1], hi[r]);
    }
  }
  return w[0];
}

// Plane p of 16 widened code bytes of B bits as floats (the top plane needs no mask).
template <int B>
inline f32x16 plane(u32x16 w, int p) {
  const u32x16 bits = w >> (p * B);
  return __builtin_convertvector(p == 8 / B - 1 ? bits : bits & ((1u << B) - 1u), f32x16);
}

// fp16 scales or zeros of tokens [first, first + n) of one page as floats, groups per token.
inline void load_halves(const uint8_t* field, int64_t stride, int64_t first, int64_t n,
                        int64_t groups, float* out) {
#if defined(__AVX512F__)
  if (stride == 2 * groups) {
    // The usual packed field: the block's halves are contiguous, 16 converted per instruction.
    const uint8_t* h = field + first * stride;
    const int64_t count = n * groups;
    int64_t e = 0;
    for (; e + kLanes <= count; e += kLanes) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 2 * e));
      _mm512_storeu_ps(out + e, _mm512_cvtph_ps(v));
    }
    for (; e < count; ++e) {
      out[e] = static_cast<float>(reinterpret_cast<const c10::Half*>(h)[e]);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    const auto* h = reinterpret_cast<const c10::Half*>(field + (first + t) * stride);
    for (int64_t g = 0; g < groups; ++g) {
      out[t * groups + g] = static_cast<float>(h[g]);
    }
  }
}

// Elements [16 c, 16 c + 16) of a FULL-format row of `dim` elements stored as T, as floats
// (zero past the row). The type is a template parameter: this runs once per vector of every
// row, where a switch on it would cost more than the conversion.
template <RowType T>
inline f32x16 load_chunk(const uint8_t* row, int64_t dim, int64_t c) {
  const int64_t d = c * kLanes;
  f32x16 out;
  if (d + kLanes <= dim) {
    if constexpr (T == RowType::kFloat) {
      std::memcpy(&out, row + 4 * d, sizeof out);
      return out;
    } else if constexpr (T == RowType::kBFloat16) {
      return tierkv_simd::load_bf16(reinterpret_cast<const uint16_t*>(row + 2 * d));
    } else {
#if defined(__AVX512F__)
      const __m512 f =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * d)));
      std::memcpy(&out, &f, sizeof f);
      return out;
#endif
    }
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    float x = 0.0f;
    if (d + l < dim) {
      if constexpr (T == RowType::kFloat) {
        std::memcpy(&x, row + 4 * (d + l), sizeof x);
      } else if constexpr (T == RowType::kBFloat16) {
        x = static_cast<float>(reinterpret_cast<const c10::BFloat16*>(row)[d + l]);
      } else {
        x = static_cast<float>(reinterpret_cast<const c10::Half*>(row)[d + l]);
      }
    }
    out[l] = x;
  }
  return out;
}

// 32 bfloat16 elements [32 c, 32 c + 32) of a row as two float vectors in *parity order*:
// lane l of `even` is element 32 c + 2 l, of `odd` element 32 c + 2 l + 1. A bfloat16 is the
// top half of a float32, so one 64-byte load, a shift and a mask give 32 floats, where
// widening 16 at a time (load_chunk) takes six instructions per 16; with a GQA group of 3 the
// widening was half of a bfloat16 ring token's instructions.
inline void load_parity(const uint8_t* row, int64_t c, f32x16& even, f32x16& odd) {
  u32x16 w;
  std::memcpy(&w, row + 64 * c, sizeof w);
  const u32x16 e = w << 16;
  const u32x16 o = w & 0xFFFF0000u;
  std::memcpy(&even, &e, sizeof even);
  std::memcpy(&odd, &o, sizeof odd);
}

// Where element d of a natural-order row sits among a row's vectors: in parity order (bfloat16
// rows of whole 32-element chunks, see load_parity) or in natural order.
inline std::pair<int64_t, int64_t> row_lane(int64_t d, bool parity) {
  if (parity) {
    return {2 * (d / 32) + d % 2, (d % 32) / 2};
  }
  return {d / kLanes, d % kLanes};
}

// Codes of one side (keys or values) in vector form: a token row of `nbytes` bytes is
// `chunks` chunks of 16 bytes; plane p of chunk c, lane l is channel (16 c + l) * planes + p.
// idx[c] maps each lane of chunk c to the group of its byte (lanes past the row: group 0).
// When groups span whole chunks (`whole`), a chunk's lanes share one scale: a broadcast of
// idx[c][0]'s instead of a permute.
struct Side {
  int64_t nbytes;
  int64_t chunks;
  bool whole;
  std::vector<i32x16> idx;

  Side(int64_t dim, int bits, int64_t groups) {
    nbytes = dim * bits / 8;
    chunks = (nbytes + kLanes - 1) / kLanes;
    const int64_t group_bytes = nbytes / groups;
    whole = group_bytes % kLanes == 0;
    idx.resize(static_cast<size_t>(chunks));
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t j = c * kLanes + l;
        idx[c][l] = static_cast<int32_t>(j < nbytes ? j / group_bytes : 0);
      }
    }
  }
};

// Attention of the query heads of one work item over its tokens: writes it.out [group, dim]
// (natural channel order, float32), it.lse [group] and, when asked, it.probs. G > 0 fixes the
// number of query heads per KV head at compile time (their logit sums then live in
// registers); G == 0 takes sh.group.
template <int KB, int VB, int G>
void attend(const Shared& sh, const Item& it) {
  const Layout& lay = sh.lay;
  const int64_t group = G > 0 ? G : sh.group;
  constexpr int kTile = G > 0 ? G : 1;
  constexpr int kKP = 8 / KB;  // key planes
  constexpr int kVP = 8 / VB;  // value planes
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  const int64_t dim = lay.head_dim;
  const int64_t groups = lay.groups;
  const int64_t tpp = lay.tokens_per_page;
  const Side ks(dim, KB, groups), vs(dim, VB, groups);
  const int64_t kvec = kKP * ks.chunks;  // vectors of one query head (key order)
  const int64_t vvec = kVP * vs.chunks;  // vectors of one output head (value order)
  // The ring serves the newest positions of the range, the quantized pages the older ones.
  const int64_t ring_from = it.residual > 0 ? std::max(it.start, it.end - it.residual) : it.end;
  const bool ring = ring_from < it.end;
  const int64_t nvec = (dim + kLanes - 1) / kLanes;  // vectors of a natural-order row

  // Queries in key plane order, zero in lanes past the row so those lanes add nothing.
  std::vector<f32x16> qp(static_cast<size_t>(group * kvec), f32x16{});
  for (int64_t i = 0; i < group; ++i) {
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t p = d % kKP, j = d / kKP;
      qp[i * kvec + p * ks.chunks + j / kLanes][j % kLanes] = it.q[i * dim + d] * sh.sm_scale;
    }
  }
  // Each head's query summed over each group's channels (lane g, 0 past the groups): a key
  // scale * code + zero is dotted as its scaled codes, plus its zeros dotted with these sums.
  std::vector<f32x16> qsum(static_cast<size_t>(group), f32x16{});
  for (int64_t i = 0; i < group; ++i) {
    for (int64_t d = 0; d < dim; ++d) {
      qsum[i][d / (dim / groups)] += it.q[i * dim + d] * sh.sm_scale;
    }
  }
  std::vector<f32x16> acc(static_cast<size_t>(group * vvec), f32x16{});
  // The ring's rows are in natural channel order: queries, a row and the values' sums too.
  std::vector<f32x16> qn(static_cast<size_t>(ring ? group * nvec : 0), f32x16{});
  std::vector<f32x16> acc_n(qn.size(), f32x16{});
  // The key and value rows of one block of ring positions.
  const uint8_t* k_rows[kBlock];
  const uint8_t* v_rows[kBlock];
  // bfloat16 ring rows of whole 32-element chunks are read in parity order (load_parity): the
  // queries and the values' sums then take that order too.
  const bool parity = sh.ring.type == RowType::kBFloat16 && dim % 32 == 0;
  for (int64_t i = 0; ring && i < group; ++i) {
    for (int64_t d = 0; d < dim; ++d) {
      const auto [v, lane] = row_lane(d, parity);
      qn[i * nvec + v][lane] = it.q[i * dim + d] * sh.sm_scale;
    }
  }
  f32x16 tot_fixed[G > 0 ? G : 1];
  std::vector<f32x16> tot_any(static_cast<size_t>(G > 0 ? 0 : group));
  f32x16* tot = G > 0 ? tot_fixed : tot_any.data();
  std::vector<uint8_t> pad(static_cast<size_t>(std::max(ks.chunks, vs.chunks) * kLanes), 0);
  // Scales and zeros of one block's tokens, with a vector's worth of (finite) padding.
  std::vector<float> s_buf(static_cast<size_t>(kBlock * groups + kLanes), 0.0f);
  std::vector<float> z_buf(s_buf.size(), 0.0f);
  std::vector<float> logits(static_cast<size_t>(group * kBlock));
  // Each head's lane products of each token of a block, summed 16 tokens at a time.
  std::vector<f32x16> dots(static_cast<size_t>(group * kBlock), f32x16{});
  std::vector<float> run_max(static_cast<size_t>(group), kMasked);
  std::vector<float> run_sum(static_cast<size_t>(group), 0.0f);
  std::vector<uint8_t> visible(static_cast<size_t>(it.masked ? kBlock : 0));

  // One online-softmax update over the logits of a block of n tokens (columns [col, col + n)
  // of the probabilities; -inf: masked): the block's maximum rescales the running sums once,
  // and the logits become the weights of the block's values. The probabilities keep the raw
  // logits until the log-sum-exp is known.
  const auto update = [&](int64_t n, int64_t col) {
    // Whole vectors of logits, the lanes past n masked (their weights are then 0).
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = 0; i < group; ++i) {
      float* l = logits.data() + i * kBlock;
      if (it.probs != nullptr) {
        std::copy(l, l + n, it.probs + i * it.probs_stride + col - it.probs_base);
      }
      std::fill(l + n, l + padded, kMasked);
      f32x16 top = broadcast(run_max[i]);
      for (int64_t t = 0; t < padded; t += kLanes) {
        const f32x16 x = load(l + t);
        top = x > top ? x : top;
      }
      float new_max = top[0];
      for (int lane = 1; lane < kLanes; ++lane) {
        new_max = std::max(new_max, top[lane]);
      }
      // The first block rescales nothing: its alpha is 0 and the sums are still 0.
      const float alpha = exp_nonpositive(run_max[i] - new_max);
      run_max[i] = new_max;
      f32x16 sum{};
      for (int64_t t = 0; t < padded; t += kLanes) {
        const f32x16 e = exp_nonpositive(load(l + t) - new_max);
        std::memcpy(l + t, &e, sizeof e);
        sum += e;
      }
      run_sum[i] = run_sum[i] * alpha + hsum(sum);
      if (alpha != 1.0f) {
        for (int64_t v = 0; v < vvec; ++v) {
          acc[i * vvec + v] *= alpha;
        }
        for (int64_t v = 0; ring && v < nvec; ++v) {
          acc_n[i * nvec + v] *= alpha;
        }
      }
    }
  };

  for (int64_t t0 = it.start; t0 < ring_from;) {
    // A block never crosses a page: its tokens share one page id.
    const int64_t column = t0 / tpp;
    const int64_t first = t0 - column * tpp;
    const int64_t n = std::min({ring_from - t0, tpp - first, kBlock});
    const uint8_t* base = page_base(sh, it.pages[column]);
    // The next page's lines are fetched while this block computes: pages are scattered over
    // the arena, so the hardware prefetchers, which stop at 4 KiB boundaries, restart cold on
    // each of them (about half the time of a large batch went to those misses).
    if (first + n == tpp && t0 + n < ring_from) {
      const int64_t next = it.pages[column + 1];
      if (next >= 0 && next < sh.num_pages) {
        const uint8_t* ahead = sh.arena + next * sh.page_bytes;
        for (int64_t b = 0; b < sh.page_bytes; b += 64) {
          __builtin_prefetch(ahead + b);
        }
      }
    }

    if (it.masked) {
      int64_t seen = 0;
      for (int64_t t = 0; t < n; ++t) {
        int32_t pos;
        std::memcpy(&pos, base + lay.pos.offset + (first + t) * lay.pos.stride, sizeof pos);
        visible[t] = pos <= it.query_pos && (it.window <= 0 || pos > it.query_pos - it.window);
        seen += visible[t];
      }
      if (seen == 0) {
        // Nothing to read: the probabilities of the block's tokens are 0.
        for (int64_t i = 0; it.probs != nullptr && i < group; ++i) {
          float* p = it.probs + i * it.probs_stride + t0;
          std::fill(p, p + n, kMasked);
        }
        t0 += n;
        continue;
      }
    }

    // Logits of the block: each token's codes times their scales, dotted with each head, plus
    // its zeros dotted with the head's group sums; the lanes are summed 16 tokens at a time.
    // Masked tokens are computed like the others (their bytes are real tokens') and dropped.
    load_halves(base + lay.k_scale.offset, lay.k_scale.stride, first, n, groups, s_buf.data());
    load_halves(base + lay.k_zero.offset, lay.k_zero.stride, first, n, groups, z_buf.data());
    for (int64_t t = 0; t < n; ++t) {
      const uint8_t* row_k = code_row(
          base + lay.k_codes.offset + (first + t) * lay.k_codes.stride, ks.nbytes,
          lay.k_overread, pad.data());
      const float* st = s_buf.data() + t * groups;
      const f32x16 z = load(z_buf.data() + t * groups);
      for (int64_t i = 0; i < group; ++i) {
        tot[i] = z * qsum[i];
      }
      for (int64_t c = 0; c < ks.chunks; ++c) {
        const u32x16 w = widen(row_k + c * kLanes);
        const f32x16 sc = ks.whole ? broadcast(st[ks.idx[c][0]]) : spread(load(st), ks.idx[c]);
        for (int p = 0; p < kKP; ++p) {
          const f32x16 x = plane<KB>(w, p) * sc;
          const f32x16* qv = qp.data() + p * ks.chunks + c;
          for (int64_t i = 0; i < group; ++i) {
            tot[i] += qv[i * kvec] * x;
          }
        }
      }
      for (int64_t i = 0; i < group; ++i) {
        dots[i * kBlock + t] = tot[i];
      }
    }
    // Lanes of tokens past n hold stale (finite) products: their sums land past the logits.
    for (int64_t i = 0; i < group; ++i) {
      for (int64_t t = 0; t < n; t += kLanes) {
        const f32x16 sum = hsum16(dots.data() + i * kBlock + t);
        std::memcpy(logits.data() + i * kBlock + t, &sum, sizeof sum);
      }
      for (int64_t t = 0; it.masked && t < n; ++t) {
        if (!visible[t]) {
          logits[i * kBlock + t] = kMasked;
        }
      }
    }
    update(n, t0);

    // Values of the block, weighted by each head's probabilities (masked tokens: weight 0,
    // and their bytes are real tokens', so finite): the scaled codes here, the zeros summed
    // by group (lane g) once per block.
    load_halves(base + lay.v_scale.offset, lay.v_scale.stride, first, n, groups, s_buf.data());
    load_halves(base + lay.v_zero.offset, lay.v_zero.stride, first, n, groups, z_buf.data());
    for (int64_t i = 0; i < group; ++i) {
      // Two sums in registers, so the adds do not all wait on each other's latency.
      const float* l = logits.data() + i * kBlock;
      f32x16 zsum{}, zsum_odd{};
      int64_t t = 0;
      for (; t + 2 <= n; t += 2) {
        zsum += l[t] * load(z_buf.data() + t * groups);
        zsum_odd += l[t + 1] * load(z_buf.data() + (t + 1) * groups);
      }
      if (t < n) {
        zsum += l[t] * load(z_buf.data() + t * groups);
      }
      zsum += zsum_odd;
      for (int64_t c = 0; c < vs.chunks; ++c) {
        const f32x16 zc = spread(zsum, vs.idx[c]);
        for (int p = 0; p < kVP; ++p) {
          acc[i * vvec + p * vs.chunks + c] += zc;
        }
      }
    }
    // Chunk by chunk, so each head's sums of the chunk stay in registers over the block's
    // tokens (heads are taken GT at a time: all of them when G is fixed).
    for (int64_t i0 = 0; i0 < group; i0 += kTile) {
      for (int64_t c = 0; c < vs.chunks; ++c) {
        f32x16 part[kTile][kVP] = {};
        for (int64_t t = 0; t < n; ++t) {
          const uint8_t* row_v = code_row(
              base + lay.v_codes.offset + (first + t) * lay.v_codes.stride, vs.nbytes,
              lay.v_overread, pad.data());
          const u32x16 w = widen(row_v + c * kLanes);
          const float* st = s_buf.data() + t * groups;
          const f32x16 sc =
              vs.whole ? broadcast(st[vs.idx[c][0]]) : spread(load(st), vs.idx[c]);
          for (int p = 0; p < kVP; ++p) {
            const f32x16 x = plane<VB>(w, p) * sc;
            for (int i = 0; i < kTile; ++i) {
              part[i][p] += logits[(i0 + i) * kBlock + t] * x;
            }
          }
        }
        for (int i = 0; i < kTile; ++i) {
          for (int p = 0; p < kVP; ++p) {
            acc[(i0 + i) * vvec + p * vs.chunks + c] += part[i][p];
          }
        }
      }
    }
    t0 += n;
  }

  // The residual ring, and the whole range of uncompressed slots (``decode_full``): blocks of
  // up to kBlock positions, which may span several of its pages (a FULL page holds few
  // tokens); each row is converted to floats a vector at a time where it is used (for the
  // stored dtype known at compile time), never into a buffer: converting a block of bfloat16
  // rows into float scratch first cost 17% more at 32 requests x 600 tokens. The logits are
  // summed 16 tokens at a time and the values taken chunk by chunk, as above; the next
  // block's rows are fetched while a block computes.
  const RingLayout& rl = sh.ring;
  const int64_t row_bytes = dim * (rl.type == RowType::kFloat ? 4 : 2);
  // The key and value rows of consecutive positions from `position` on: one page lookup for
  // both, and divisions only at the start (two per token cost more than a bf16 token's math).
  struct RingCursor {
    const Shared& sh;
    const Item& it;
    int64_t index, column, slot;
    RingCursor(const Shared& shared, const Item& item, int64_t position)
        : sh(shared), it(item), index(position % item.ring_size),
          column(index / shared.ring.tokens_per_page),
          slot(index - column * shared.ring.tokens_per_page) {}
    std::pair<const uint8_t*, const uint8_t*> next() {
      const RingLayout& rl = sh.ring;
      const uint8_t* page = page_base(sh, it.ring_pages[column]);
      std::pair rows{page + rl.k.offset + slot * rl.k.stride,
                     page + rl.v.offset + slot * rl.v.stride};
      if (++index == it.ring_size) {
        index = column = slot = 0;
      } else if (++slot == rl.tokens_per_page) {
        slot = 0;
        ++column;
      }
      return rows;
    }
  };
  for (int64_t p0 = ring_from; p0 < it.end;) {
    const int64_t n = std::min(it.end - p0, kBlock);
    RingCursor cursor(sh, it, p0);
    for (int64_t t = 0; t < n; ++t) {
      std::tie(k_rows[t], v_rows[t]) = cursor.next();
    }
    // The next block's rows are fetched while this one computes.
    const int64_t ahead = std::min(it.end - p0 - n, kBlock);
    for (int64_t t = 0; t < ahead; ++t) {
      const auto [k_row, v_row] = cursor.next();
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(k_row + b);
        __builtin_prefetch(v_row + b);
      }
    }
    const auto attend_block = [&](auto type) {
      // A key row converted a vector at a time as it is dotted with the heads of a tile (all of
      // them when G is fixed), never stored.
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t i0 = 0; i0 < group; i0 += kTile) {
          f32x16 sum[kTile] = {};
          if (parity) {
            for (int64_t c = 0; c < nvec; c += 2) {
              f32x16 even, odd;
              load_parity(k_rows[t], c / 2, even, odd);
              for (int i = 0; i < kTile; ++i) {
                sum[i] += qn[(i0 + i) * nvec + c] * even + qn[(i0 + i) * nvec + c + 1] * odd;
              }
            }
          }
          for (int64_t c = 0; !parity && c < nvec; ++c) {
            const f32x16 k = load_chunk<decltype(type)::value>(k_rows[t], dim, c);
            for (int i = 0; i < kTile; ++i) {
              sum[i] += qn[(i0 + i) * nvec + c] * k;
            }
          }
          for (int i = 0; i < kTile; ++i) {
            dots[(i0 + i) * kBlock + t] = sum[i];
          }
        }
      }
      for (int64_t i = 0; i < group; ++i) {
        for (int64_t t = 0; t < n; t += kLanes) {
          const f32x16 sum = hsum16(dots.data() + i * kBlock + t);
          std::memcpy(logits.data() + i * kBlock + t, &sum, sizeof sum);
        }
      }
      update(n, p0);
      for (int64_t i0 = 0; parity && i0 < group; i0 += kTile) {
        for (int64_t c = 0; c < nvec; c += 2) {
          f32x16 part_even[kTile] = {}, part_odd[kTile] = {};
          for (int64_t t = 0; t < n; ++t) {
            f32x16 even, odd;
            load_parity(v_rows[t], c / 2, even, odd);
            for (int i = 0; i < kTile; ++i) {
              const float w = logits[(i0 + i) * kBlock + t];
              part_even[i] += w * even;
              part_odd[i] += w * odd;
            }
          }
          for (int i = 0; i < kTile; ++i) {
            acc_n[(i0 + i) * nvec + c] += part_even[i];
            acc_n[(i0 + i) * nvec + c + 1] += part_odd[i];
          }
        }
      }
      for (int64_t i0 = 0; !parity && i0 < group; i0 += kTile) {
        for (int64_t c = 0; c < nvec; ++c) {
          f32x16 part[kTile] = {};
          for (int64_t t = 0; t < n; ++t) {
            const f32x16 x = load_chunk<decltype(type)::value>(v_rows[t], dim, c);
            for (int i = 0; i < kTile; ++i) {
              part[i] += logits[(i0 + i) * kBlock + t] * x;
            }
          }
          for (int i = 0; i < kTile; ++i) {
            acc_n[(i0 + i) * nvec + c] += part[i];
          }
        }
      }
    };
    switch (rl.type) {
      case RowType::kFloat:
        attend_block(std::integral_constant<RowType, RowType::kFloat>{});
        break;
      case RowType::kBFloat16:
        attend_block(std::integral_constant<RowType, RowType::kBFloat16>{});
        break;
      case RowType::kHalf:
        attend_block(std::integral_constant<RowType, RowType::kHalf>{});
        break;
    }
    p0 += n;
  }

  for (int64_t i = 0; i < group; ++i) {
    float* o = it.out + i * dim;
    float* probs = it.probs != nullptr ? it.probs + i * it.probs_stride : nullptr;
    if (run_sum[i] == 0.0f) {
      // No visible token: an empty softmax, which merges with any other part as weight 0.
      std::fill(o, o + dim, 0.0f);
      it.lse[i] = kMasked;
      if (probs != nullptr) {
        std::fill(probs, probs + it.probs_width, 0.0f);
      }
      continue;
    }
    const float inv = 1.0f / run_sum[i];
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t p = d % kVP, j = d / kVP;
      const auto [v, lane] = row_lane(d, parity);
      const float ring_sum = ring ? acc_n[i * nvec + v][lane] : 0.0f;
      o[d] = (acc[i * vvec + p * vs.chunks + j / kLanes][j % kLanes] + ring_sum) * inv;
    }
    const float lse = run_max[i] + std::log(run_sum[i]);
    it.lse[i] = lse;
    if (probs != nullptr) {
      // The raw logits of the range become probabilities; columns outside it are 0.
      const int64_t start = it.start - it.probs_base, end = it.end - it.probs_base;
      std::fill(probs, probs + start, 0.0f);
      int64_t t = start;
      for (; t + kLanes <= end; t += kLanes) {
        const f32x16 e = exp_nonpositive(load(probs + t) - lse);
        std::memcpy(probs + t, &e, sizeof e);
      }
      for (; t < end; ++t) {
        probs[t] = exp_nonpositive(probs[t] - lse);
      }
      std::fill(probs + end, probs + it.probs_width, 0.0f);
    }
  }
}

using AttendFn = decltype(&attend<8, 8, 0>);

// Query heads per KV head up to 8 each get their own instantiation: the generic one keeps the
// heads' sums in memory and unpacks every value once per head, which cost 1.4-1.8x per query
// head at batch 1 (GQA 12/4 and 14/2 against 16/4, 512 tokens).
template <int KB, int VB>
AttendFn pick_group(int64_t group) {
  switch (group) {
    case 1:
      return &attend<KB, VB, 1>;
    case 2:
      return &attend<KB, VB, 2>;
    case 3:
      return &attend<KB, VB, 3>;
    case 4:
      return &attend<KB, VB, 4>;
    case 5:
      return &attend<KB, VB, 5>;
    case 6:
      return &attend<KB, VB, 6>;
    case 7:
      return &attend<KB, VB, 7>;
    case 8:
      return &attend<KB, VB, 8>;
    default:
      return &attend<KB, VB, 0>;
  }
}

// The kernels' instantiation list: one entry per (key bits, value bits) pair of tierkv's
// formats (tierkv/kv/formats/quant.py's QUANTIZED_BITS; k8v8 also carries the uncompressed
// rings). `pick` serves only these, and the cpu backend declares what it serves from this table
// (`kernel_bit_pairs`), so a format without a kernel is refused by name before a call.
struct KernelEntry {
  int64_t key_bits, value_bits;
  AttendFn (*by_group)(int64_t);
};
constexpr KernelEntry kKernels[] = {
    {8, 8, &pick_group<8, 8>}, {8, 4, &pick_group<8, 4>}, {8, 2, &pick_group<8, 2>},
    {4, 4, &pick_group<4, 4>}, {4, 2, &pick_group<4, 2>}, {4, 1, &pick_group<4, 1>},
    {2, 2, &pick_group<2, 2>},
};

// torch.ops.tierkv.kernel_bit_pairs: the table as [key bits, value bits] lists.
std::vector<std::vector<int64_t>> kernel_bit_pairs() {
  std::vector<std::vector<int64_t>> pairs;
  for (const KernelEntry& k : kKernels) pairs.push_back({k.key_bits, k.value_bits});
  return pairs;
}

AttendFn pick(int64_t key_bits, int64_t value_bits, int64_t group) {
  for (const KernelEntry& k : kKernels) {
    if (k.key_bits == key_bits && k.value_bits == value_bits) return k.by_group(group);
  }
  TORCH_CHECK(false, "no kernel for ", key_bits, "-bit keys with ", value_bits,
              "-bit values (see kernel_bit_pairs)");
}

RowType row_type(const std::string& dtype) {
  if (dtype == "float32") {
    return RowType::kFloat;
  }
  if (dtype == "bfloat16") {
    return RowType::kBFloat16;
  }
  TORCH_CHECK(dtype == "float16", "ring dtype must be float32, bfloat16 or float16, got ", dtype);
  return RowType::kHalf;
}

// The page layout of one format, its fields checked against the page: offsets and strides of
// k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos.
Layout make_layout(int64_t dim, int64_t key_bits, int64_t value_bits, int64_t group_size,
                   const std::vector<int64_t>& offsets, const std::vector<int64_t>& strides,
                   int64_t tokens_per_page, int64_t page_bytes) {
  TORCH_CHECK(offsets.size() >= 7 && strides.size() >= 7,
              "offsets and strides: k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos");
  TORCH_CHECK(tokens_per_page > 0, "tokens_per_page must be positive");
  const int64_t width = std::min(group_size, dim);
  TORCH_CHECK(width > 0 && dim % width == 0, "group size ", group_size, " does not divide ", dim);
  const int64_t groups = dim / width;
  TORCH_CHECK(groups <= kLanes, "at most ", kLanes, " groups of channels per head, got ", groups);
  for (int64_t bits : {key_bits, value_bits}) {
    TORCH_CHECK(width * bits % 8 == 0, bits, "-bit groups of ", width, " channels split a byte");
  }
  const int64_t need[7] = {dim * key_bits / 8, 2 * groups, 2 * groups,
                           dim * value_bits / 8, 2 * groups, 2 * groups, 4};
  for (int i = 0; i < 7; ++i) {
    TORCH_CHECK(strides[i] >= need[i], "field ", i, " stride ", strides[i], " < ", need[i]);
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + tokens_per_page * strides[i] <= page_bytes,
                "field ", i, " does not fit a page");
    // fp16 scales and zeros are read in place: keep them aligned (codes are loaded a chunk
    // at a time and positions copied, at any alignment).
    const bool codes_or_pos = i == 0 || i == 3 || i == 6;
    TORCH_CHECK(codes_or_pos || (offsets[i] % 2 == 0 && strides[i] % 2 == 0),
                "fp16 fields must be 2-byte aligned");
  }
  const Layout lay{
      {offsets[0], strides[0]}, {offsets[1], strides[1]}, {offsets[2], strides[2]},
      {offsets[3], strides[3]}, {offsets[4], strides[4]}, {offsets[5], strides[5]},
      {offsets[6], strides[6]}, tokens_per_page, dim, groups,
      // A 16-byte load past a row's last byte must stay inside the page.
      offsets[0] + tokens_per_page * strides[0] + kLanes <= page_bytes,
      offsets[3] + tokens_per_page * strides[3] + kLanes <= page_bytes};
  return lay;
}

std::tuple<at::Tensor, at::Tensor> paged_decode(
    const at::Tensor& q,
    const at::Tensor& arena,
    const at::Tensor& pages,
    const at::Tensor& starts,
    const at::Tensor& ends,
    double sm_scale,
    int64_t key_bits,
    int64_t value_bits,
    int64_t group_size,
    std::vector<int64_t> offsets,
    std::vector<int64_t> strides,
    int64_t tokens_per_page,
    const std::optional<at::Tensor>& ring,
    const std::optional<at::Tensor>& ring_size,
    const std::optional<at::Tensor>& residual,
    std::vector<int64_t> ring_fields,
    int64_t ring_tokens_per_page,
    const std::string& ring_dtype) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, Hq, D]");
  TORCH_CHECK(arena.dim() == 2 && arena.scalar_type() == at::kByte && arena.is_contiguous(),
              "arena must be a contiguous uint8 [pages, page_bytes] tensor");
  TORCH_CHECK(pages.dim() == 3 && pages.scalar_type() == at::kLong,
              "pages must be int64 [B, H, P]");
  TORCH_CHECK(starts.scalar_type() == at::kLong && ends.scalar_type() == at::kLong,
              "starts and ends must be int64");
  TORCH_CHECK(q.device().is_cpu() && arena.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(offsets.size() == 7 && strides.size() == 7,
              "offsets and strides: k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos");
  const int64_t batch = q.size(0);
  const int64_t q_heads = q.size(1);
  const int64_t dim = q.size(2);
  const int64_t kv_heads = pages.size(1);
  TORCH_CHECK(pages.size(0) == batch, "q and pages disagree on the batch size");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0,
              "query heads must be a multiple of KV heads");
  // Ranges per request ([B]) or per (request, KV head) ([B, H]).
  const bool per_head = ends.dim() == 2;
  TORCH_CHECK(starts.sizes() == ends.sizes() &&
                  (per_head ? ends.size(0) == batch && ends.size(1) == kv_heads
                            : ends.dim() == 1 && ends.size(0) == batch),
              "starts and ends must both be [B] or both [B, H]");

  const Layout lay = make_layout(dim, key_bits, value_bits, group_size, offsets, strides,
                                 tokens_per_page, arena.size(1));
  const int64_t page_bytes = arena.size(1);
  RingLayout ring_lay{{0, 0}, {0, 0}, 1, RowType::kFloat};
  at::Tensor ring_table, ring_len, ring_window;
  if (ring.has_value()) {
    TORCH_CHECK(ring_size.has_value() && residual.has_value(),
                "a ring needs its ring_size and residual");
    TORCH_CHECK(ring->dim() == 3 && ring->scalar_type() == at::kLong &&
                    ring->size(0) == batch && ring->size(1) == kv_heads,
                "ring must be int64 [B, H, P]");
    TORCH_CHECK(ring_size->scalar_type() == at::kLong && ring_size->numel() == batch &&
                    residual->scalar_type() == at::kLong && residual->numel() == batch,
                "ring_size and residual must be int64 [B]");
    TORCH_CHECK(ring_fields.size() == 4, "ring_fields: k offset, k stride, v offset, v stride");
    TORCH_CHECK(ring_tokens_per_page > 0, "ring_tokens_per_page must be positive");
    ring_lay = RingLayout{{ring_fields[0], ring_fields[1]}, {ring_fields[2], ring_fields[3]},
                          ring_tokens_per_page, row_type(ring_dtype)};
    const int64_t row_bytes = dim * (ring_lay.type == RowType::kFloat ? 4 : 2);
    for (const Field& f : {ring_lay.k, ring_lay.v}) {
      TORCH_CHECK(f.stride >= row_bytes && f.offset >= 0 &&
                      f.offset + ring_tokens_per_page * f.stride <= page_bytes &&
                      f.offset % 2 == 0 && f.stride % 2 == 0,
                  "ring rows do not fit a page");
    }
    ring_table = ring->contiguous();
    ring_len = ring_size->contiguous();
    ring_window = residual->contiguous();
  }

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor table = pages.contiguous();
  const at::Tensor lo = starts.contiguous();
  const at::Tensor hi = ends.contiguous();
  auto out = at::empty({batch, q_heads, dim}, qf.options());
  auto lse = at::empty({batch, q_heads}, qf.options());

  const int64_t columns = table.size(2);
  const int64_t ring_columns = ring.has_value() ? ring_table.size(2) : 0;
  const int64_t group = q_heads / kv_heads;
  const AttendFn fn = pick(key_bits, value_bits, group);
  const int64_t* lo_p = lo.data_ptr<int64_t>();
  const int64_t* hi_p = hi.data_ptr<int64_t>();
  const int64_t* ring_len_p = ring.has_value() ? ring_len.data_ptr<int64_t>() : nullptr;
  const int64_t* ring_window_p = ring.has_value() ? ring_window.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t res = ring_window_p != nullptr ? ring_window_p[b] : 0;
    if (ring_len_p != nullptr) {
      const int64_t size = ring_len_p[b];
      TORCH_CHECK(res >= 0 && res <= size && size % ring_tokens_per_page == 0 &&
                      size <= ring_columns * ring_tokens_per_page,
                  "ring of request ", b, ": residual ", res, ", ", size,
                  " tokens: not whole pages of its ring table holding the residual");
    }
    for (int64_t r = per_head ? b * kv_heads : b; r < (per_head ? (b + 1) * kv_heads : b + 1);
         ++r) {
      // Only the quantized part of the range is read from the page table.
      const int64_t quantized_end = res > 0 ? std::max(lo_p[r], hi_p[r] - res) : hi_p[r];
      TORCH_CHECK(lo_p[r] >= 0 && (quantized_end <= lo_p[r] ||
                                   quantized_end <= columns * tokens_per_page),
                  "token range of request ", b, " outside its page table");
    }
  }
  const Shared shared{lay,
                      ring_lay,
                      arena.data_ptr<uint8_t>(),
                      page_bytes,
                      arena.size(0),
                      group,
                      static_cast<float>(sm_scale)};
  const int64_t* table_p = table.data_ptr<int64_t>();
  const int64_t* ring_p = ring.has_value() ? ring_table.data_ptr<int64_t>() : nullptr;
  const float* q_p = qf.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t finish) {
    for (int64_t item = begin; item < finish; ++item) {
      const int64_t b = item / kv_heads;
      const int64_t head_q = item * group;  // first query head of this KV head
      const int64_t r = per_head ? item : b;
      const Item work{
          table_p + item * columns,
          lo_p[r],
          hi_p[r],
          q_p + head_q * dim,
          out_p + head_q * dim,
          lse_p + head_q,
          false,
          0,
          0,
          nullptr,
          0,
          0,
          ring_p != nullptr ? ring_p + item * ring_columns : nullptr,
          ring_len_p != nullptr ? ring_len_p[b] : 0,
          ring_window_p != nullptr ? ring_window_p[b] : 0,
          0,
      };
      fn(shared, work);
    }
  });
  if (q.scalar_type() != at::kFloat) {
    out = out.to(q.scalar_type());
  }
  return {out, lse};
}


// Both tiers of tiered slots at one layer, in one call (tierkv/kv/backends/cpu/ops.py's tiered_decode):
// per (request, KV head), the kernel attends the tokens the head holds in each tier, masked by
// their stored positions; the two parts are merged by their log-sum-exps and each tier's
// probabilities rescaled to the whole; then, with `score`, each token's stored score gains the
// largest probability any query head of its group gave it (in place, float32), and with
// `probs` the probabilities are written out. `tables` and `counts` are the store's whole
// tables ([S, L, H, 3, P], [S, L, H, 2]), read at `slots` [B] and `layer` here, so the call
// needs no per-layer gathers. `formats` holds each tier's key bits, value bits, group size and
// tokens per page; `offsets` and `strides` each tier's seven kernel fields then its score.
// With `residual` [B] (tiered slots with a residual ring, tierkv/kv/backends/tiered_ring.py), the
// newest `residual` positions up to the query are read from the slot's ring (the tables'
// third row, `ring_size` [B] tokens, FULL pages as paged_decode reads them) as a third part,
// and hidden in the tiers; each ring position's probability is folded onto its tier token.
at::Tensor tiered_decode(const at::Tensor& q, at::Tensor& arena, const at::Tensor& tables,
                         const at::Tensor& counts, const at::Tensor& slots, int64_t layer,
                         const at::Tensor& query_pos, int64_t window, double sm_scale,
                         std::vector<int64_t> formats, std::vector<int64_t> offsets,
                         std::vector<int64_t> strides, bool score,
                         const std::optional<at::Tensor>& probs, int64_t probs_split,
                         const std::optional<at::Tensor>& ring_size,
                         const std::optional<at::Tensor>& residual,
                         std::vector<int64_t> ring_fields, int64_t ring_tokens_per_page,
                         const std::string& ring_dtype) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  TORCH_CHECK(q.dim() == 3 && q.device().is_cpu(), "q must be a CPU tensor [B, Hq, D]");
  check_store_tables(arena, tables, counts);
  TORCH_CHECK(formats.size() == 8 && offsets.size() == 16 && strides.size() == 16,
              "formats: 4 per tier; offsets and strides: 8 fields per tier");
  const int64_t batch = q.size(0), q_heads = q.size(1), dim = q.size(2);
  const int64_t num_slots = tables.size(0), layers = tables.size(1), kv_heads = tables.size(2);
  const int64_t columns = tables.size(4);
  TORCH_CHECK(layer >= 0 && layer < layers, "layer ", layer, " outside the tables");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0,
              "query heads must be a multiple of KV heads");
  TORCH_CHECK(slots.dim() == 1 && slots.numel() == batch && slots.scalar_type() == at::kLong,
              "slots must be int64 [B]");
  TORCH_CHECK(query_pos.dim() == 1 && query_pos.numel() == batch &&
                  query_pos.scalar_type() == at::kLong,
              "query_pos must be int64 [B]");
  const int64_t page_bytes = arena.size(1), num_pages = arena.size(0);
  const int64_t group = q_heads / kv_heads;
  Layout lays[2] = {
      make_layout(dim, formats[0], formats[1], formats[2], {offsets.begin(), offsets.begin() + 7},
                  {strides.begin(), strides.begin() + 7}, formats[3], page_bytes),
      make_layout(dim, formats[4], formats[5], formats[6],
                  {offsets.begin() + 8, offsets.begin() + 15},
                  {strides.begin() + 8, strides.begin() + 15}, formats[7], page_bytes)};
  const AttendFn fns[2] = {pick(formats[0], formats[1], group),
                           pick(formats[4], formats[5], group)};
  for (int tier = 0; tier < 2; ++tier) {
    const int64_t so = offsets[tier * 8 + 7], ss = strides[tier * 8 + 7];
    TORCH_CHECK(so >= 0 && ss >= 4 && so + formats[tier * 4 + 3] * ss <= page_bytes,
                "the score field lies outside the page");
  }
  int64_t widths[2] = {0, 0};
  if (probs.has_value()) {
    TORCH_CHECK(probs->scalar_type() == at::kFloat && probs->dim() == 3 &&
                    probs->size(0) == batch && probs->size(1) == q_heads && probs->is_contiguous(),
                "probs must be a contiguous float32 [B, Hq, T]");
    TORCH_CHECK(probs_split >= 0 && probs_split <= probs->size(2), "probs_split outside probs");
    widths[0] = probs_split;
    widths[1] = probs->size(2) - probs_split;
  }

  RingLayout ring_lay{{0, 0}, {0, 0}, 1, RowType::kFloat};
  at::Tensor ring_len, ring_window;
  const int64_t* ring_len_p = nullptr;
  const int64_t* ring_window_p = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(ring_size.has_value(), "a residual window needs its ring_size");
    TORCH_CHECK(ring_size->scalar_type() == at::kLong && ring_size->numel() == batch &&
                    residual->scalar_type() == at::kLong && residual->numel() == batch,
                "ring_size and residual must be int64 [B]");
    TORCH_CHECK(ring_fields.size() == 4, "ring_fields: k offset, k stride, v offset, v stride");
    TORCH_CHECK(ring_tokens_per_page > 0, "ring_tokens_per_page must be positive");
    ring_lay = RingLayout{{ring_fields[0], ring_fields[1]}, {ring_fields[2], ring_fields[3]},
                          ring_tokens_per_page, row_type(ring_dtype)};
    const int64_t row_bytes = dim * (ring_lay.type == RowType::kFloat ? 4 : 2);
    for (const Field& f : {ring_lay.k, ring_lay.v}) {
      TORCH_CHECK(f.offset >= 0 && f.stride >= row_bytes &&
                      f.offset + ring_tokens_per_page * f.stride <= page_bytes,
                  "ring rows do not fit a page");
    }
    ring_len = ring_size->contiguous();
    ring_window = residual->contiguous();
    ring_len_p = ring_len.data_ptr<int64_t>();
    ring_window_p = ring_window.data_ptr<int64_t>();
  }

  const at::Tensor slot_t = slots.contiguous(), qpos_t = query_pos.contiguous();
  const int64_t* slot_p = slot_t.data_ptr<int64_t>();
  const int64_t* qpos_p = qpos_t.data_ptr<int64_t>();
  const int64_t* table_p = tables.data_ptr<int64_t>();
  const int64_t* count_p = counts.data_ptr<int64_t>();
  // Row of (request b, KV head h) in the tables, in units of (tier rows x columns).
  const auto unit = [&](int64_t b, int64_t h) {
    return (slot_p[b] * layers + layer) * kv_heads + h;
  };
  // Every page a call will read or write, checked before any is.
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(slot_p[b] >= 0 && slot_p[b] < num_slots, "slot ", slot_p[b], " outside tables");
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int tier = 0; tier < 2; ++tier) {
        const int64_t count = count_p[unit(b, h) * 2 + tier];
        const int64_t tpp = formats[tier * 4 + 3];
        TORCH_CHECK(count >= 0 && count <= columns * tpp, "a head holds ", count,
                    " tokens, more than its page table");
        TORCH_CHECK(!probs.has_value() || count <= widths[tier], "a head holds ", count,
                    " tokens, outside the probabilities' ", widths[tier], " columns");
        const int64_t* row = table_p + (unit(b, h) * 3 + tier) * columns;
        for (int64_t c = 0; c * tpp < count; ++c) {
          TORCH_CHECK(row[c] >= 0 && row[c] < num_pages, "page id ", row[c], " outside the arena");
        }
      }
      const int64_t res = ring_window_p != nullptr ? ring_window_p[b] : 0;
      if (res > 0) {
        const int64_t size = ring_len_p[b];
        TORCH_CHECK(res <= size && size % ring_tokens_per_page == 0 &&
                        size <= columns * ring_tokens_per_page,
                    "ring of request ", b, ": residual ", res, ", ", size,
                    " tokens: not whole pages of its ring table holding the residual");
        const int64_t* row = table_p + (unit(b, h) * 3 + 2) * columns;
        for (int64_t c = 0; c * ring_tokens_per_page < size; ++c) {
          TORCH_CHECK(row[c] >= 0 && row[c] < num_pages, "ring page id ", row[c],
                      " outside the arena");
        }
      }
    }
  }

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({batch, q_heads, dim}, qf.options());
  const RingLayout no_ring{{0, 0}, {0, 0}, 1, RowType::kFloat};
  uint8_t* base = arena.data_ptr<uint8_t>();
  const Shared shared[3] = {
      {lays[0], no_ring, base, page_bytes, num_pages, group, static_cast<float>(sm_scale)},
      {lays[1], no_ring, base, page_bytes, num_pages, group, static_cast<float>(sm_scale)},
      {lays[0], ring_lay, base, page_bytes, num_pages, group, static_cast<float>(sm_scale)}};
  const float* q_p = qf.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* probs_p = probs.has_value() ? probs->data_ptr<float>() : nullptr;
  const int64_t probs_cols = probs.has_value() ? probs->size(2) : 0;

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t finish) {
    std::vector<float> part_out(static_cast<size_t>(3 * group * dim));
    std::vector<float> part_lse(static_cast<size_t>(3 * group));
    std::vector<float> scratch[2];
    std::vector<float> ring_probs;
    for (int64_t item = begin; item < finish; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      const int64_t head_q = item * group;  // first query head of this KV head
      const int64_t qpos = qpos_p[b];
      const int64_t res = ring_window_p != nullptr ? ring_window_p[b] : 0;
      // The ring serves the newest `res` positions up to the query (within a sliding window);
      // the tiers the older ones, seen as if by a query `res` positions earlier whose window
      // is `res` narrower (none left: the tiers add nothing).
      const int64_t nring = std::min({res, qpos + 1, window > 0 ? window : res});
      const int64_t ring_lo = qpos + 1 - nring;
      const int64_t tier_window = window > 0 ? window - res : 0;
      const bool tiers_seen = !(res > 0 && window > 0 && tier_window <= 0);
      int64_t count[2];
      float* tier_probs[2];
      int64_t stride[2];
      for (int tier = 0; tier < 2; ++tier) {
        count[tier] = count_p[unit(b, h) * 2 + tier];
        if (probs_p != nullptr) {
          tier_probs[tier] = probs_p + head_q * probs_cols + (tier == 0 ? 0 : probs_split);
          stride[tier] = probs_cols;
        } else {
          scratch[tier].resize(static_cast<size_t>(group * count[tier]));
          tier_probs[tier] = scratch[tier].data();
          stride[tier] = count[tier];
        }
        const Item work{table_p + (unit(b, h) * 3 + tier) * columns,
                        0,
                        tiers_seen ? count[tier] : 0,
                        q_p + head_q * dim,
                        part_out.data() + tier * group * dim,
                        part_lse.data() + tier * group,
                        // A decode query comes after every token stored: only a sliding
                        // window or the ring hides some.
                        window > 0 || res > 0,
                        res > 0 ? qpos - res : qpos,
                        res > 0 ? tier_window : window,
                        tier_probs[tier],
                        stride[tier],
                        probs_p != nullptr ? widths[tier] : count[tier],
                        nullptr,
                        0,
                        0,
                        0};
        fns[tier](shared[tier], work);
      }
      float* ring_lse = part_lse.data() + 2 * group;
      if (nring > 0) {
        ring_probs.resize(static_cast<size_t>(group * nring));
        const Item work{table_p + (unit(b, h) * 3 + 2) * columns,
                        ring_lo,
                        qpos + 1,
                        q_p + head_q * dim,
                        part_out.data() + 2 * group * dim,
                        ring_lse,
                        false,
                        0,
                        0,
                        ring_probs.data(),
                        nring,
                        nring,
                        table_p + (unit(b, h) * 3 + 2) * columns,
                        ring_len_p[b],
                        nring,
                        ring_lo};
        fns[0](shared[2], work);
      } else {
        std::fill(ring_lse, ring_lse + group, kMasked);
      }
      // Merge the parts (an empty part has lse -inf and weight 0) and rescale each part's
      // probabilities from its own log-sum-exp to the whole's.
      for (int64_t i = 0; i < group; ++i) {
        const float l[3] = {part_lse[i], part_lse[group + i], ring_lse[i]};
        const float hi = std::max({l[0], l[1], l[2]});
        float lse = kMasked;
        if (hi != kMasked) {
          lse = hi + std::log(std::exp(l[0] - hi) + std::exp(l[1] - hi) + std::exp(l[2] - hi));
        }
        const float safe = lse == kMasked ? 0.0f : lse;
        const float w[3] = {std::exp(l[0] - safe), std::exp(l[1] - safe), std::exp(l[2] - safe)};
        float* o = out_p + (head_q + i) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          o[d] = part_out[i * dim + d] * w[0] + part_out[(group + i) * dim + d] * w[1];
          if (nring > 0) {
            o[d] += part_out[(2 * group + i) * dim + d] * w[2];
          }
        }
        for (int tier = 0; tier < 2; ++tier) {
          float* row = tier_probs[tier] + i * stride[tier];
          for (int64_t t = 0; t < count[tier]; ++t) {
            row[t] *= w[tier];
          }
        }
        for (int64_t t = 0; t < nring; ++t) {
          ring_probs[i * nring + t] *= w[2];
        }
      }
      // Each ring position's probability goes to its token in the tiers (hidden there, so at
      // 0), found by the token's stored position.
      for (int tier = 0; nring > 0 && tier < 2; ++tier) {
        const Layout& lay = lays[tier];
        const int64_t tpp = lay.tokens_per_page;
        const int64_t* row = table_p + (unit(b, h) * 3 + tier) * columns;
        for (int64_t t = 0; t < count[tier]; ++t) {
          int32_t pos;
          const uint8_t* page = base + row[t / tpp] * page_bytes;
          std::memcpy(&pos, page + lay.pos.offset + (t % tpp) * lay.pos.stride, sizeof pos);
          if (pos < ring_lo || pos > qpos) {
            continue;
          }
          for (int64_t i = 0; i < group; ++i) {
            tier_probs[tier][i * stride[tier] + t] += ring_probs[i * nring + (pos - ring_lo)];
          }
        }
      }
      if (!score) {
        continue;
      }
      // Each token's stored score gains its largest probability over the query heads.
      for (int tier = 0; tier < 2; ++tier) {
        const int64_t tpp = formats[tier * 4 + 3];
        const int64_t so = offsets[tier * 8 + 7], ss = strides[tier * 8 + 7];
        const int64_t* row = table_p + (unit(b, h) * 3 + tier) * columns;
        for (int64_t t = 0; t < count[tier]; ++t) {
          float top = tier_probs[tier][t];
          for (int64_t i = 1; i < group; ++i) {
            top = std::max(top, tier_probs[tier][i * stride[tier] + t]);
          }
          uint8_t* at = base + row[t / tpp] * page_bytes + so + (t % tpp) * ss;
          float stored;
          std::memcpy(&stored, at, sizeof stored);
          stored += top;
          std::memcpy(at, &stored, sizeof stored);
        }
      }
    }
  });
  if (q.scalar_type() != at::kFloat) {
    out = out.to(q.scalar_type());
  }
  return out;
}

}  // namespace

// Schemas in tierkv/csrc/registration.cpp. kernel_bit_pairs takes no tensor, so no dispatch
// key could select it: it is registered for every backend.
TORCH_LIBRARY_IMPL(tierkv, CatchAll, m) {
  m.impl("kernel_bit_pairs", &kernel_bit_pairs);
}

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("tiered_decode", &tiered_decode);
}
