// Quantize new tokens and store them straight into their pages: the write half of the store.
//
// tierkv/kv/formats/quant.py's quantize + KVFormat.encode followed by one indexed store per page field
// is about 70 small torch ops per layer and step, several times the arithmetic at decode sizes.
// This op does the same per (token, KV head) in one call and writes the same bytes: min/max per
// group of channels, zero = min rounded down to fp16, scale = (max - zero) / qmax rounded up to
// fp16 (at least the smallest normal float32 when the span is positive), codes = round half to
// even of (x - zero) / scale clamped to [0, qmax], packed low bits first; score and position
// beside them. tests/test_kv_native_quantize.py compares the bytes with the torch path.
//
// Registered as torch.ops.tierkv.quantize_store and store_rows (schemas in
// tierkv/csrc/registration.cpp), so it loads with the rest of the native extension
// (tierkv/extension.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Fields in the order of `offsets` and `strides`.
enum FieldIndex { kKCodes, kKScale, kKZero, kVCodes, kVScale, kVZero, kScore, kPos, kFields };

uint16_t to_half_bits(float x) {
  return c10::Half(x).x;  // round to nearest even, as torch's .half()
}

float from_half_bits(uint16_t bits) {
  c10::Half h;
  h.x = bits;
  return static_cast<float>(h);
}

// torch.nextafter(h, +inf) (up) or (h, -inf) on fp16 bit patterns.
uint16_t next_half(uint16_t h, bool up) {
  const bool negative = h & 0x8000u;
  const bool zero = (h & 0x7FFFu) == 0;
  if ((h & 0x7C00u) == 0x7C00u && (h & 0x03FFu) != 0) {
    return h;  // NaN
  }
  if (up) {
    if (h == 0x7C00u) return h;  // +inf stays
    if (zero) return 0x0001u;
    return negative ? h - 1 : h + 1;
  }
  if (h == 0xFC00u) return h;  // -inf stays
  if (zero) return 0x8001u;
  return negative ? h + 1 : h - 1;
}

// x rounded to fp16 towards +inf (up) or -inf: quant.py's _round_fp16.
uint16_t round_half(float x, bool up) {
  const uint16_t nearest = to_half_bits(x);
  const float back = from_half_bits(nearest);
  const bool wrong_side = up ? back < x : back > x;
  return wrong_side ? next_half(nearest, up) : nearest;
}

// Quantize one row of `dim` floats in groups of `width` channels; writes packed codes
// (dim * bits / 8 bytes) and the fp16 scale and zero bit patterns of each group.
void quantize_row(const float* x, int64_t dim, int64_t width, int bits, uint8_t* codes,
                  uint16_t* scales, uint16_t* zeros, std::vector<uint8_t>& scratch) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t groups = dim / width;
  scratch.resize(static_cast<size_t>(dim));
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * width;
    float low = xg[0], high = xg[0];
    for (int64_t i = 1; i < width; ++i) {
      low = std::min(low, xg[i]);
      high = std::max(high, xg[i]);
    }
    const uint16_t zero_bits = round_half(low, false);
    const float zero = from_half_bits(zero_bits);
    const float span = high - zero;
    const float ideal = span > 0.0f ? std::max(span / qmax, FLT_MIN) : 0.0f;
    const uint16_t scale_bits = round_half(ideal, true);
    const float step = from_half_bits(scale_bits);
    const float safe = step > 0.0f ? step : 1.0f;
    for (int64_t i = 0; i < width; ++i) {
      // nearbyint rounds half to even under the default rounding mode, as torch.round does.
      const float code = std::nearbyint((xg[i] - zero) / safe);
      scratch[g * width + i] = static_cast<uint8_t>(std::min(std::max(code, 0.0f), qmax));
    }
    scales[g] = scale_bits;
    zeros[g] = zero_bits;
  }
  const int per_byte = 8 / bits;
  const int64_t nbytes = dim * bits / 8;
  for (int64_t j = 0; j < nbytes; ++j) {
    unsigned byte = 0;
    for (int p = 0; p < per_byte; ++p) {
      byte |= static_cast<unsigned>(scratch[j * per_byte + p]) << (p * bits);
    }
    codes[j] = static_cast<uint8_t>(byte);
  }
}

void quantize_store(const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                    at::Tensor arena, const at::Tensor& pages, const at::Tensor& slots,
                    int64_t key_bits, int64_t value_bits, int64_t group_size,
                    std::vector<int64_t> offsets, std::vector<int64_t> strides) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k and v must be [N, H, D] alike");
  TORCH_CHECK(arena.dim() == 2 && arena.scalar_type() == at::kByte && arena.is_contiguous(),
              "arena must be a contiguous uint8 [pages, page_bytes] tensor");
  TORCH_CHECK(offsets.size() == kFields && strides.size() == kFields,
              "offsets and strides of k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, "
              "score, pos");
  const int64_t n = k.size(0), heads = k.size(1), dim = k.size(2);
  TORCH_CHECK(pages.sizes() == at::IntArrayRef({n, heads}) && slots.sizes() == pages.sizes(),
              "pages and slots must be [N, H]");
  TORCH_CHECK(positions.numel() == n, "one position per token");
  const int64_t width = std::min(group_size, dim);
  TORCH_CHECK(width > 0 && dim % width == 0, "group size ", group_size, " does not divide ", dim);
  for (int64_t bits : {key_bits, value_bits}) {
    TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "bits must be 1, 2, 4 or 8");
    TORCH_CHECK(width * bits % 8 == 0, bits, "-bit groups of ", width, " channels split a byte");
  }
  const int64_t page_bytes = arena.size(1), num_pages = arena.size(0);
  const at::Tensor kf = k.to(at::kFloat).contiguous();
  const at::Tensor vf = v.to(at::kFloat).contiguous();
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor page_ids = pages.to(at::kLong).contiguous();
  const at::Tensor rows = slots.to(at::kLong).contiguous();
  const float* k_p = kf.data_ptr<float>();
  const float* v_p = vf.data_ptr<float>();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  const int64_t* page_p = page_ids.data_ptr<int64_t>();
  const int64_t* row_p = rows.data_ptr<int64_t>();
  uint8_t* base = arena.data_ptr<uint8_t>();
  const int64_t groups = dim / width;
  const int64_t tokens_per_page_bound = page_bytes;  // a row index is checked against the page

  // A few hundred rows are a few microseconds: only large writes (prefill) use threads.
  at::parallel_for(0, n * heads, 256, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch;
    std::vector<uint16_t> scale(static_cast<size_t>(groups)), zero(static_cast<size_t>(groups));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t page = page_p[item], row = row_p[item];
      TORCH_CHECK(page >= 0 && page < num_pages, "page id ", page, " outside the arena");
      TORCH_CHECK(row >= 0 && row < tokens_per_page_bound, "row ", row, " outside the page");
      uint8_t* pg = base + page * page_bytes;
      auto at_field = [&](int f) {
        const int64_t offset = offsets[f] + row * strides[f];
        TORCH_CHECK(offset + strides[f] <= page_bytes, "field ", f, " of row ", row,
                    " outside the page");
        return pg + offset;
      };
      const int sides[2][4] = {{kKCodes, kKScale, kKZero, static_cast<int>(key_bits)},
                               {kVCodes, kVScale, kVZero, static_cast<int>(value_bits)}};
      const float* src[2] = {k_p + item * dim, v_p + item * dim};
      for (int s = 0; s < 2; ++s) {
        quantize_row(src[s], dim, width, sides[s][3], at_field(sides[s][0]), scale.data(),
                     zero.data(), scratch);
        std::memcpy(at_field(sides[s][1]), scale.data(), sizeof(uint16_t) * groups);
        std::memcpy(at_field(sides[s][2]), zero.data(), sizeof(uint16_t) * groups);
      }
      const float score = 0.0f;
      const int32_t position = static_cast<int32_t>(pos_p[item / heads]);
      std::memcpy(at_field(kScore), &score, sizeof score);
      std::memcpy(at_field(kPos), &position, sizeof position);
    }
  });
}

// The uncompressed (FULL-format) write: the row of token n, head h of `k` and `v` [N, H, D]
// (stored dtype, channels contiguous) copied to row rows[n, h] of page pages[n, h], at byte
// `k_offset` / `v_offset` of the page plus the row times `row_bytes`. Two indexed stores per
// layer in torch cost more than the copy at decode sizes.
void store_rows(const at::Tensor& k, const at::Tensor& v, at::Tensor arena,
                const at::Tensor& pages, const at::Tensor& rows, int64_t k_offset,
                int64_t v_offset, int64_t row_bytes) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "k and v must be [N, H, D] alike");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "channels must be contiguous");
  TORCH_CHECK(arena.dim() == 2 && arena.scalar_type() == at::kByte && arena.is_contiguous(),
              "arena must be a contiguous uint8 [pages, page_bytes] tensor");
  const int64_t n = k.size(0), heads = k.size(1);
  TORCH_CHECK(pages.sizes() == at::IntArrayRef({n, heads}) && rows.sizes() == pages.sizes(),
              "pages and rows must be [N, H]");
  const int64_t bytes = k.size(2) * k.element_size();
  TORCH_CHECK(bytes == row_bytes, "a row of ", k.size(2), " ", k.scalar_type(), " is ", bytes,
              " bytes, the page's rows ", row_bytes);
  const int64_t page_bytes = arena.size(1), num_pages = arena.size(0);
  const at::Tensor page_ids = pages.to(at::kLong).contiguous();
  const at::Tensor row_ids = rows.to(at::kLong).contiguous();
  const int64_t* page_p = page_ids.data_ptr<int64_t>();
  const int64_t* row_p = row_ids.data_ptr<int64_t>();
  const auto* k_p = static_cast<const uint8_t*>(k.data_ptr());
  const auto* v_p = static_cast<const uint8_t*>(v.data_ptr());
  const int64_t elem = k.element_size();
  uint8_t* base = arena.data_ptr<uint8_t>();
  at::parallel_for(0, n * heads, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t page = page_p[item], row = row_p[item];
      TORCH_CHECK(page >= 0 && page < num_pages, "page id ", page, " outside the arena");
      const int64_t k_at = k_offset + row * row_bytes, v_at = v_offset + row * row_bytes;
      TORCH_CHECK(row >= 0 && std::max(k_at, v_at) + row_bytes <= page_bytes, "row ", row,
                  " outside the page");
      const int64_t t = item / heads, h = item % heads;
      uint8_t* pg = base + page * page_bytes;
      std::memcpy(pg + k_at, k_p + (t * k.stride(0) + h * k.stride(1)) * elem, bytes);
      std::memcpy(pg + v_at, v_p + (t * v.stride(0) + h * v.stride(1)) * elem, bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("quantize_store", &quantize_store);
  m.impl("store_rows", &store_rows);
}
