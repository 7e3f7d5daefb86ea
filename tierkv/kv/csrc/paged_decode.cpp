// Decode attention (one query token per request) straight over tierkv's paged, quantized KV
// store. See tierkv/kv/native.py for the contract; this file is the kernel.
//
// One work item is one (request, KV head): its query heads (the GQA group) are processed
// together, so every key and value byte is read once. Pages are read in place from the arena
// through the page table, one block of up to kBlock tokens of one page at a time:
//   1. logits: each key's codes are unpacked 16 bytes at a time into float vectors in "plane
//      order" (plane p holds the codes at bit p * bits of every byte, so unpacking is a shift
//      and a mask, no shuffle), dequantized in registers (x = scale * code + zero, the lanes'
//      scales picked by one permute) and dotted with every query head, whose channels were
//      put in the same order once per work item;
//   2. one online-softmax update per block: the block's maximum rescales the running sums
//      once, and the exponentials are taken over the block in one vectorisable loop;
//   3. values: chunk by chunk over the block's tokens, so each head's sums of a chunk stay in
//      registers, dequantized the same way; the plane order is undone once at the end.
// Everything is float32. SIMD is written with GCC/Clang vector extensions (16 floats, one
// AVX-512 register with -march=native, split by the compiler on narrower machines); the
// number of query heads per KV head is a template parameter for 1, 2, 4 and 8.
//
// Measured (demo shapes, k8v4, 1 thread, 2048 tokens, one layer): a first version written as
// plain loops for the auto-vectoriser (dequantize a token into a buffer, then dot products)
// took 66 ns per (token, KV head); GCC turned its short per-group loops into versioned
// vector loops and the u8 -> u32 widening into scalar code. This version takes 27-45 ns.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// GCC/Clang vector extensions: explicit SIMD without intrinsics, so one source serves every
// instruction set the compiler targets.
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

// One per-token field of a page: where it starts in the page and how many bytes a token takes.
struct Field {
  int64_t offset;
  int64_t stride;
};

// Everything a work item needs to find and decode a token.
struct Layout {
  Field k_codes, k_scale, k_zero, v_codes, v_scale, v_zero;
  int64_t tokens_per_page;
  int64_t head_dim;
  int64_t groups;
  // Whether a 16-byte load at the last chunk of a token's codes stays inside the page (the
  // bytes past the row are then read and ignored instead of copied byte by byte).
  bool k_overread;
  bool v_overread;
};

// exp(x) for x <= 0 in plain arithmetic (so a loop of it vectorises): x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by its Taylor series to degree 7 (relative error below 1e-8), and
// 2^n built in the exponent bits. Inputs below -87 give about 1.6e-38 instead of underflowing.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  // ln2 split in two so that n * hi is exact (hi has 9 significant bits, |n| <= 126).
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(f32x16 v) {
  f32x8 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  lo += hi;
  float sum = 0.0f;
  for (int l = 0; l < 8; ++l) {
    sum += lo[l];
  }
  return sum;
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

// fp16 scales or zeros of tokens [first, first + n) of one page as floats, groups per token.
inline void load_halves(const uint8_t* field, int64_t stride, int64_t first, int64_t n,
                        int64_t groups, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const auto* h = reinterpret_cast<const c10::Half*>(field + (first + t) * stride);
    for (int64_t g = 0; g < groups; ++g) {
      out[t * groups + g] = static_cast<float>(h[g]);
    }
  }
}

// Codes of one side (keys or values) in vector form: a token row of `nbytes` bytes is
// `chunks` chunks of 16 bytes; plane p of chunk c, lane l is channel (16 c + l) * planes + p.
// idx[c] maps each lane of chunk c to the group of its byte (lanes past the row: group 0).
struct Side {
  int64_t nbytes;
  int64_t chunks;
  std::vector<i32x16> idx;

  Side(int64_t dim, int bits, int64_t groups) {
    nbytes = dim * bits / 8;
    chunks = (nbytes + kLanes - 1) / kLanes;
    const int64_t group_bytes = nbytes / groups;
    idx.resize(static_cast<size_t>(chunks));
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t j = c * kLanes + l;
        idx[c][l] = static_cast<int32_t>(j < nbytes ? j / group_bytes : 0);
      }
    }
  }
};

// Attention of the `group` query heads `q` [group, dim] (channel order) over tokens
// [start, end) of one (request, KV head) whose page ids are `pages`. Writes out [group, dim]
// (channel order, float32) and lse [group]. G > 0 fixes the number of query heads per KV head
// at compile time (their logit sums then live in registers); G == 0 takes `group`.
template <int KB, int VB, int G>
void attend(
    const Layout& lay,
    const uint8_t* arena,
    int64_t page_bytes,
    int64_t num_pages,
    const int64_t* pages,
    int64_t start,
    int64_t end,
    const float* q,
    int64_t group_arg,
    float sm_scale,
    float* out,
    float* lse) {
  const int64_t group = G > 0 ? G : group_arg;
  constexpr int kTile = G > 0 ? G : 1;
  constexpr int kKP = 8 / KB;  // key planes
  constexpr int kVP = 8 / VB;  // value planes
  constexpr unsigned kKMask = (1u << KB) - 1u;
  constexpr unsigned kVMask = (1u << VB) - 1u;
  const int64_t dim = lay.head_dim;
  const int64_t groups = lay.groups;
  const int64_t tpp = lay.tokens_per_page;
  const Side ks(dim, KB, groups), vs(dim, VB, groups);
  const int64_t kvec = kKP * ks.chunks;  // vectors of one query head (key order)
  const int64_t vvec = kVP * vs.chunks;  // vectors of one output head (value order)

  // Queries in key plane order, zero in lanes past the row so those lanes add nothing.
  std::vector<f32x16> qp(static_cast<size_t>(group * kvec), f32x16{});
  for (int64_t i = 0; i < group; ++i) {
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t p = d % kKP, j = d / kKP;
      qp[i * kvec + p * ks.chunks + j / kLanes][j % kLanes] = q[i * dim + d] * sm_scale;
    }
  }
  std::vector<f32x16> acc(static_cast<size_t>(group * vvec), f32x16{});
  f32x16 tot_fixed[G > 0 ? G : 1];
  std::vector<f32x16> tot_any(static_cast<size_t>(G > 0 ? 0 : group));
  f32x16* tot = G > 0 ? tot_fixed : tot_any.data();
  std::vector<uint8_t> pad(static_cast<size_t>(std::max(ks.chunks, vs.chunks) * kLanes), 0);
  // Scales and zeros of one block's tokens, with a vector's worth of (finite) padding.
  std::vector<float> s_buf(static_cast<size_t>(kBlock * groups + kLanes), 0.0f);
  std::vector<float> z_buf(s_buf.size(), 0.0f);
  std::vector<float> logits(static_cast<size_t>(group * kBlock));
  std::vector<float> run_max(static_cast<size_t>(group), -std::numeric_limits<float>::infinity());
  std::vector<float> run_sum(static_cast<size_t>(group), 0.0f);

  for (int64_t t0 = start; t0 < end;) {
    // A block never crosses a page: its tokens share one page id.
    const int64_t column = t0 / tpp;
    const int64_t first = t0 - column * tpp;
    const int64_t n = std::min({end - t0, tpp - first, kBlock});
    const int64_t page = pages[column];
    TORCH_CHECK(page >= 0 && page < num_pages, "page id ", page, " outside the arena");
    const uint8_t* base = arena + page * page_bytes;

    // Logits of the block: key x = scale * code + zero per lane, dotted with each head.
    load_halves(base + lay.k_scale.offset, lay.k_scale.stride, first, n, groups, s_buf.data());
    load_halves(base + lay.k_zero.offset, lay.k_zero.stride, first, n, groups, z_buf.data());
    for (int64_t t = 0; t < n; ++t) {
      const uint8_t* row = code_row(base + lay.k_codes.offset + (first + t) * lay.k_codes.stride,
                                    ks.nbytes, lay.k_overread, pad.data());
      const f32x16 s = load(s_buf.data() + t * groups);
      const f32x16 z = load(z_buf.data() + t * groups);
      for (int64_t i = 0; i < group; ++i) {
        tot[i] = f32x16{};
      }
      for (int64_t c = 0; c < ks.chunks; ++c) {
        const u32x16 w = widen(row + c * kLanes);
        const f32x16 sc = spread(s, ks.idx[c]);
        const f32x16 zc = spread(z, ks.idx[c]);
        for (int p = 0; p < kKP; ++p) {
          const f32x16 x =
              __builtin_convertvector((w >> (p * KB)) & kKMask, f32x16) * sc + zc;
          const f32x16* qv = qp.data() + p * ks.chunks + c;
          for (int64_t i = 0; i < group; ++i) {
            tot[i] += qv[i * kvec] * x;
          }
        }
      }
      for (int64_t i = 0; i < group; ++i) {
        logits[i * kBlock + t] = hsum(tot[i]);
      }
    }

    // Online softmax: the block's maximum rescales the running sums once.
    for (int64_t i = 0; i < group; ++i) {
      float* l = logits.data() + i * kBlock;
      const float new_max = std::max(run_max[i], *std::max_element(l, l + n));
      // The first block rescales nothing: its alpha is ~0 and the sums are still 0.
      const float alpha = exp_nonpositive(run_max[i] - new_max);
      run_max[i] = new_max;
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        l[t] = exp_nonpositive(l[t] - new_max);
        sum += l[t];
      }
      run_sum[i] = run_sum[i] * alpha + sum;
      if (alpha != 1.0f) {
        for (int64_t v = 0; v < vvec; ++v) {
          acc[i * vvec + v] *= alpha;
        }
      }
    }

    // Values of the block, weighted by each head's probabilities.
    load_halves(base + lay.v_scale.offset, lay.v_scale.stride, first, n, groups, s_buf.data());
    load_halves(base + lay.v_zero.offset, lay.v_zero.stride, first, n, groups, z_buf.data());
    // Chunk by chunk, so each head's sums of the chunk stay in registers over the block's
    // tokens (heads are taken GT at a time: all of them when G is fixed).
    for (int64_t i0 = 0; i0 < group; i0 += kTile) {
      for (int64_t c = 0; c < vs.chunks; ++c) {
        f32x16 part[kTile][kVP] = {};
        for (int64_t t = 0; t < n; ++t) {
          const uint8_t* row = code_row(
              base + lay.v_codes.offset + (first + t) * lay.v_codes.stride, vs.nbytes,
              lay.v_overread, pad.data());
          const u32x16 w = widen(row + c * kLanes);
          const f32x16 sc = spread(load(s_buf.data() + t * groups), vs.idx[c]);
          const f32x16 zc = spread(load(z_buf.data() + t * groups), vs.idx[c]);
          for (int p = 0; p < kVP; ++p) {
            const f32x16 x =
                __builtin_convertvector((w >> (p * VB)) & kVMask, f32x16) * sc + zc;
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

  for (int64_t i = 0; i < group; ++i) {
    float* o = out + i * dim;
    if (run_sum[i] == 0.0f) {
      // No visible token: an empty softmax, which merges with any other part as weight 0.
      std::fill(o, o + dim, 0.0f);
      lse[i] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float inv = 1.0f / run_sum[i];
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t p = d % kVP, j = d / kVP;
      o[d] = acc[i * vvec + p * vs.chunks + j / kLanes][j % kLanes] * inv;
    }
    lse[i] = run_max[i] + std::log(run_sum[i]);
  }
}

using AttendFn = decltype(&attend<8, 8, 0>);

template <int KB, int VB>
AttendFn pick_group(int64_t group) {
  switch (group) {
    case 1:
      return &attend<KB, VB, 1>;
    case 2:
      return &attend<KB, VB, 2>;
    case 4:
      return &attend<KB, VB, 4>;
    case 8:
      return &attend<KB, VB, 8>;
    default:
      return &attend<KB, VB, 0>;
  }
}

template <int KB>
AttendFn pick_value_bits(int64_t value_bits, int64_t group) {
  switch (value_bits) {
    case 8:
      return pick_group<KB, 8>(group);
    case 4:
      return pick_group<KB, 4>(group);
    case 2:
      return pick_group<KB, 2>(group);
    case 1:
      return pick_group<KB, 1>(group);
    default:
      TORCH_CHECK(false, "value bits must be 8, 4, 2 or 1, got ", value_bits);
  }
}

AttendFn pick(int64_t key_bits, int64_t value_bits, int64_t group) {
  switch (key_bits) {
    case 8:
      return pick_value_bits<8>(value_bits, group);
    case 4:
      return pick_value_bits<4>(value_bits, group);
    case 2:
      return pick_value_bits<2>(value_bits, group);
    case 1:
      return pick_value_bits<1>(value_bits, group);
    default:
      TORCH_CHECK(false, "key bits must be 8, 4, 2 or 1, got ", key_bits);
  }
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
    int64_t tokens_per_page) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, Hq, D]");
  TORCH_CHECK(arena.dim() == 2 && arena.scalar_type() == at::kByte && arena.is_contiguous(),
              "arena must be a contiguous uint8 [pages, page_bytes] tensor");
  TORCH_CHECK(pages.dim() == 3 && pages.scalar_type() == at::kLong,
              "pages must be int64 [B, H, P]");
  TORCH_CHECK(starts.scalar_type() == at::kLong && ends.scalar_type() == at::kLong,
              "starts and ends must be int64");
  TORCH_CHECK(q.device().is_cpu() && arena.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(offsets.size() == 6 && strides.size() == 6,
              "offsets and strides: k_codes, k_scale, k_zero, v_codes, v_scale, v_zero");
  const int64_t batch = q.size(0);
  const int64_t q_heads = q.size(1);
  const int64_t dim = q.size(2);
  const int64_t kv_heads = pages.size(1);
  TORCH_CHECK(pages.size(0) == batch && starts.numel() == batch && ends.numel() == batch,
              "q, pages, starts and ends disagree on the batch size");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0,
              "query heads must be a multiple of KV heads");
  TORCH_CHECK(tokens_per_page > 0, "tokens_per_page must be positive");

  const int64_t width = std::min(group_size, dim);
  TORCH_CHECK(width > 0 && dim % width == 0, "group size ", group_size, " does not divide ", dim);
  const int64_t groups = dim / width;
  TORCH_CHECK(groups <= kLanes, "at most ", kLanes, " groups of channels per head, got ", groups);
  for (int64_t bits : {key_bits, value_bits}) {
    TORCH_CHECK(width * bits % 8 == 0, bits, "-bit groups of ", width, " channels split a byte");
  }
  const int64_t page_bytes = arena.size(1);
  const int64_t need[6] = {dim * key_bits / 8, 2 * groups, 2 * groups,
                           dim * value_bits / 8, 2 * groups, 2 * groups};
  for (int i = 0; i < 6; ++i) {
    TORCH_CHECK(strides[i] >= need[i], "field ", i, " stride ", strides[i], " < ", need[i]);
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + tokens_per_page * strides[i] <= page_bytes,
                "field ", i, " does not fit a page");
    // fp16 scales and zeros are read in place: keep them aligned.
    TORCH_CHECK(i % 3 == 0 || (offsets[i] % 2 == 0 && strides[i] % 2 == 0),
                "fp16 fields must be 2-byte aligned");
  }
  const Layout lay{
      {offsets[0], strides[0]}, {offsets[1], strides[1]}, {offsets[2], strides[2]},
      {offsets[3], strides[3]}, {offsets[4], strides[4]}, {offsets[5], strides[5]},
      tokens_per_page, dim, groups,
      // A 16-byte load past a row's last byte must stay inside the page.
      offsets[0] + tokens_per_page * strides[0] + kLanes <= page_bytes,
      offsets[3] + tokens_per_page * strides[3] + kLanes <= page_bytes};

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor table = pages.contiguous();
  const at::Tensor lo = starts.contiguous();
  const at::Tensor hi = ends.contiguous();
  auto out = at::empty({batch, q_heads, dim}, qf.options());
  auto lse = at::empty({batch, q_heads}, qf.options());

  const int64_t columns = table.size(2);
  const int64_t group = q_heads / kv_heads;
  const AttendFn fn = pick(key_bits, value_bits, group);
  const int64_t* lo_p = lo.data_ptr<int64_t>();
  const int64_t* hi_p = hi.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lo_p[b] >= 0 && hi_p[b] <= columns * tokens_per_page,
                "token range of request ", b, " outside its page table");
  }
  const uint8_t* arena_p = arena.data_ptr<uint8_t>();
  const int64_t num_pages = arena.size(0);
  const int64_t* table_p = table.data_ptr<int64_t>();
  const float* q_p = qf.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const float scale = static_cast<float>(sm_scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t finish) {
    for (int64_t item = begin; item < finish; ++item) {
      const int64_t b = item / kv_heads;
      const int64_t head_q = item * group;  // first query head of this KV head
      fn(lay, arena_p, page_bytes, num_pages, table_p + item * columns, lo_p[b], hi_p[b],
         q_p + head_q * dim, group, scale, out_p + head_q * dim, lse_p + head_q);
    }
  });
  if (q.scalar_type() != at::kFloat) {
    out = out.to(q.scalar_type());
  }
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode,
        "Decode attention over quantized pages: (out [B, Hq, D] in q's dtype, lse [B, Hq] fp32)",
        py::arg("q"), py::arg("arena"), py::arg("pages"), py::arg("starts"), py::arg("ends"),
        py::arg("sm_scale"), py::arg("key_bits"), py::arg("value_bits"), py::arg("group_size"),
        py::arg("offsets"), py::arg("strides"), py::arg("tokens_per_page"));
}
