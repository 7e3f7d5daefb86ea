// Compaction of tiered slots after a decision, the part that moves bytes (tierkv/kv/policy/compact.py).
//
// compact.py's torch path finds the holes and the tokens that fill them with nonzero, then
// reads and writes every field of the moved tokens with one indexed copy per field and tier,
// and decodes the demoted tokens the same way: about sixty small torch ops per decision, a
// few hundred microseconds whatever the number of tokens. This op does it per (request, KV
// head) unit in one pass over its masks, spread over torch's intra-op threads:
//   1. the high tokens demoted to the low tier are decoded to float32 keys and values (codes
//      times scale plus zero: the product of an 8-bit code and an fp16 scale is exact in
//      float32, so the one rounding of the sum is torch's addcmul bit for bit), with their
//      positions and scores, into the rows the caller then re-quantizes into the low tier;
//   2. in each tier, the kept tokens past the new count fill the holes before it, the r-th
//      such token the r-th hole, every field's bytes copied (holes and movers are disjoint,
//      so nothing is read after it is written).
// The caller resizes the tiers' pages in between (surplus freed, missing allocated) and
// stores the demoted rows (KVStore.put_tokens). tests/test_kv_tiers.py compares the arena
// bytes with the torch path's.
//
// Registered as torch.ops.tierkv.compact_tiers (schema in tierkv/csrc/registration.cpp).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "store_tables.h"

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// The eight per-token fields of a quantized layout, in the order of `offsets` and `strides`.
enum FieldIndex { kKCodes, kKScale, kKZero, kVCodes, kVScale, kVZero, kScore, kPos, kFields };

struct TierLayout {
  int64_t offsets[kFields];
  int64_t strides[kFields];
  int64_t tokens_per_page;
};

TierLayout tier_layout(const std::vector<int64_t>& offsets, const std::vector<int64_t>& strides,
                       int64_t tokens_per_page, int64_t page_bytes) {
  TORCH_CHECK(offsets.size() == kFields && strides.size() == kFields,
              "offsets and strides of k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, "
              "score, pos");
  TORCH_CHECK(tokens_per_page > 0, "tokens_per_page must be positive");
  TierLayout lay{};
  for (int f = 0; f < kFields; ++f) {
    TORCH_CHECK(offsets[f] >= 0 && strides[f] > 0 &&
                    offsets[f] + tokens_per_page * strides[f] <= page_bytes,
                "field ", f, " does not fit a page");
    lay.offsets[f] = offsets[f];
    lay.strides[f] = strides[f];
  }
  lay.tokens_per_page = tokens_per_page;
  return lay;
}

float half_to_float(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h.x, p, sizeof h.x);
  return static_cast<float>(h);
}

// Channel d of a token's codes at `bits` bits: byte d / (8 / bits), bits (d % (8 / bits)) *
// bits upwards (quant.py's pack), scaled and shifted by its group's fp16 scale and zero.
void dequantize(const uint8_t* codes, const uint8_t* scale, const uint8_t* zero, int64_t bits,
                int64_t dim, int64_t width, float* out) {
  const int64_t per_byte = 8 / bits;
  const int mask = (1 << bits) - 1;
  for (int64_t d = 0; d < dim; ++d) {
    const int code = (codes[d / per_byte] >> ((d % per_byte) * bits)) & mask;
    const int64_t g = d / width;
    out[d] = half_to_float(zero + 2 * g) + static_cast<float>(code) * half_to_float(scale + 2 * g);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_tiers(
    at::Tensor& arena, const at::Tensor& tables, const at::Tensor& counts,
    const at::Tensor& slots, int64_t layer, const at::Tensor& keep_high, const at::Tensor& demote,
    const at::Tensor& keep_low, std::vector<int64_t> high_format, std::vector<int64_t> high_offsets,
    std::vector<int64_t> high_strides, int64_t low_tokens_per_page,
    std::vector<int64_t> low_offsets, std::vector<int64_t> low_strides) {
  check_store_tables(arena, tables, counts);
  TORCH_CHECK(high_format.size() == 3, "high_format: key bits, value bits, tokens per page");
  const int64_t num_slots = tables.size(0), layers = tables.size(1), heads = tables.size(2);
  const int64_t columns = tables.size(4);
  const int64_t page_bytes = arena.size(1), num_pages = arena.size(0);
  TORCH_CHECK(layer >= -1 && layer < layers, "layer ", layer, " outside the tables");
  // A unit is one (layer, KV head) of a slot: every layer's heads when layer is -1.
  const int64_t units = layer < 0 ? layers * heads : heads;
  const int64_t batch = slots.numel();
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong, "slots must be int64 [B]");
  for (const at::Tensor* m : {&keep_high, &demote, &keep_low}) {
    TORCH_CHECK(m->dim() == 3 && m->scalar_type() == at::kBool && m->is_contiguous() &&
                    m->size(0) == batch && m->size(1) == units,
                "masks must be contiguous bool [B, units, T]");
  }
  TORCH_CHECK(demote.size(2) == keep_high.size(2), "demote and keep_high disagree on columns");
  const int64_t key_bits = high_format[0], value_bits = high_format[1];
  for (int64_t bits : {key_bits, value_bits}) {
    TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "bits must be 1, 2, 4 or 8");
  }
  const TierLayout lays[2] = {
      tier_layout(high_offsets, high_strides, high_format[2], page_bytes),
      tier_layout(low_offsets, low_strides, low_tokens_per_page, page_bytes)};
  // The head dim and group width, from the packed widths of the key codes and the scales.
  const int64_t dim = lays[0].strides[kKCodes] * 8 / key_bits;
  const int64_t groups = lays[0].strides[kKScale] / 2;
  TORCH_CHECK(groups > 0 && dim % groups == 0 && lays[0].strides[kVCodes] * 8 / value_bits == dim,
              "the high layout's codes and scales disagree on the head dim");
  const int64_t width = dim / groups;

  const at::Tensor slot_t = slots.contiguous();
  const int64_t* slot_p = slot_t.data_ptr<int64_t>();
  const int64_t* table_p = tables.data_ptr<int64_t>();
  const int64_t* count_p = counts.data_ptr<int64_t>();
  const bool* masks[3] = {keep_high.data_ptr<bool>(), demote.data_ptr<bool>(),
                          keep_low.data_ptr<bool>()};
  const int64_t mask_width[3] = {keep_high.size(2), demote.size(2), keep_low.size(2)};
  // Row of unit u of request b in the tables, in units of (tier rows x columns).
  const auto row = [&](int64_t b, int64_t u) {
    return layer < 0 ? slot_p[b] * units + u : (slot_p[b] * layers + layer) * heads + u;
  };
  // Checks first (a mask naming a token past the head's count, a page id outside the arena),
  // with each unit's tokens per mask (kept high, demoted, kept low) and first demoted row.
  std::vector<int64_t> marked(static_cast<size_t>(batch * units * 3), 0);
  std::vector<int64_t> first(static_cast<size_t>(batch * units + 1), 0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(slot_p[b] >= 0 && slot_p[b] < num_slots, "slot ", slot_p[b], " outside tables");
    for (int64_t u = 0; u < units; ++u) {
      const int64_t item = b * units + u;
      for (int m = 0; m < 3; ++m) {
        const int tier = m == 2 ? 1 : 0;
        const int64_t count = count_p[row(b, u) * 2 + tier];
        TORCH_CHECK(count >= 0 && count <= columns * lays[tier].tokens_per_page,
                    "a head holds more tokens than its page table");
        const bool* mask = masks[m] + item * mask_width[m];
        for (int64_t t = 0; t < mask_width[m]; ++t) {
          TORCH_CHECK(!mask[t] || t < count, "a mask names token ", t, " of a head holding ",
                      count);
          marked[item * 3 + m] += mask[t];
        }
        const int64_t* pages = table_p + (row(b, u) * 3 + tier) * columns;
        for (int64_t c = 0; c * lays[tier].tokens_per_page < count; ++c) {
          TORCH_CHECK(pages[c] >= 0 && pages[c] < num_pages, "page id ", pages[c],
                      " outside the arena");
        }
      }
      first[item + 1] = first[item] + marked[item * 3 + 1];
    }
  }
  const int64_t total = first.back();
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor unit_out = at::empty({total}, i64), index_out = at::empty({total}, i64);
  at::Tensor k_out = at::empty({total, dim}, f32), v_out = at::empty({total, dim}, f32);
  at::Tensor pos_out = at::empty({total}, i64), score_out = at::empty({total}, f32);
  int64_t* unit_p = unit_out.data_ptr<int64_t>();
  int64_t* index_p = index_out.data_ptr<int64_t>();
  float* k_p = k_out.data_ptr<float>();
  float* v_p = v_out.data_ptr<float>();
  int64_t* pos_p = pos_out.data_ptr<int64_t>();
  float* score_p = score_out.data_ptr<float>();
  uint8_t* base = arena.data_ptr<uint8_t>();

  at::parallel_for(0, batch * units, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> holes, movers;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / units, u = item % units;
      const int64_t* tier_pages[2] = {table_p + (row(b, u) * 3) * columns,
                                      table_p + (row(b, u) * 3 + 1) * columns};
      const auto token = [&](int tier, int64_t t) {
        const int64_t tpp = lays[tier].tokens_per_page;
        return std::pair{base + tier_pages[tier][t / tpp] * page_bytes, t % tpp};
      };
      const auto field = [&](int tier, int64_t t, int f) {
        const auto [page, slot] = token(tier, t);
        return page + lays[tier].offsets[f] + slot * lays[tier].strides[f];
      };
      // 1. The demoted tokens, decoded, bound for the places after the kept low ones.
      const int64_t kept_low = marked[item * 3 + 2];
      const bool* demote_m = masks[1] + item * mask_width[1];
      int64_t out = first[item];
      for (int64_t t = 0; t < mask_width[1]; ++t) {
        if (!demote_m[t]) continue;
        unit_p[out] = item;
        index_p[out] = kept_low + (out - first[item]);
        dequantize(field(0, t, kKCodes), field(0, t, kKScale), field(0, t, kKZero), key_bits, dim,
                   width, k_p + out * dim);
        dequantize(field(0, t, kVCodes), field(0, t, kVScale), field(0, t, kVZero), value_bits,
                   dim, width, v_p + out * dim);
        int32_t pos;
        std::memcpy(&pos, field(0, t, kPos), sizeof pos);
        pos_p[out] = pos;
        std::memcpy(score_p + out, field(0, t, kScore), sizeof(float));
        ++out;
      }
      // 2. In each tier, the kept tokens past the new count fill the holes before it.
      for (int tier = 0; tier < 2; ++tier) {
        const int m = tier == 0 ? 0 : 2;
        const bool* keep = masks[m] + item * mask_width[m];
        const int64_t kept = marked[item * 3 + m];
        holes.clear();
        movers.clear();
        for (int64_t t = 0; t < mask_width[m]; ++t) {
          if (t < kept && !keep[t]) holes.push_back(t);
          if (t >= kept && keep[t]) movers.push_back(t);
        }
        for (size_t r = 0; r < holes.size(); ++r) {
          for (int f = 0; f < kFields; ++f) {
            std::memcpy(field(tier, holes[r], f), field(tier, movers[r], f),
                        static_cast<size_t>(lays[tier].strides[f]));
          }
        }
      }
    }
  });
  return {unit_out, index_out, k_out, v_out, pos_out, score_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("compact_tiers", &compact_tiers);
}
