// Add the attention a decode step gave each token of a tiered slot to its stored score, in place.
//
// tierkv/kv/tiered.py's score update (read every token's score, add the step's attention, write
// every page's scores back) is a gather, a max, an add and a scatter per tier and layer: on
// the demo model at 32 requests x 1536 tokens about 1 ms of a step, whether or not the step
// then decides. This op walks each (request, KV head)'s pages once and adds, for each token it
// holds, the largest probability any query head of its group gave it. The kernel's
// probabilities of one tier are relative to that tier's log-sum-exp: each query head's are
// multiplied by its `rescale` here (exp(lse_tier - lse)), the multiply the torch path does
// before its max and add, so the bytes are the same.
//
// Registered as torch.ops.tierkv.add_scores (a fragment of quantize_store.cpp's library).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

void add_scores(const at::Tensor& probs, const at::Tensor& rescale, at::Tensor& arena,
                const at::Tensor& pages, const at::Tensor& counts, int64_t score_offset,
                int64_t score_stride, int64_t tokens_per_page) {
  TORCH_CHECK(probs.dim() == 4 && probs.scalar_type() == at::kFloat,
              "probs must be float32 [B, H, G, W]");
  TORCH_CHECK(rescale.scalar_type() == at::kFloat && rescale.sizes() == probs.sizes().slice(0, 3),
              "rescale must be float32 [B, H, G]");
  TORCH_CHECK(probs.stride(3) == 1, "probs must have unit stride over tokens");
  TORCH_CHECK(arena.dim() == 2 && arena.scalar_type() == at::kByte && arena.is_contiguous(),
              "arena must be a contiguous uint8 [pages, page_bytes] tensor");
  TORCH_CHECK(pages.dim() == 3 && pages.scalar_type() == at::kLong, "pages must be int64 [B, H, P]");
  TORCH_CHECK(counts.dim() == 2 && counts.scalar_type() == at::kLong, "counts must be int64 [B, H]");
  const int64_t batch = probs.size(0), heads = probs.size(1), group = probs.size(2);
  const int64_t width = probs.size(3);
  TORCH_CHECK(pages.size(0) == batch && pages.size(1) == heads && counts.size(0) == batch &&
                  counts.size(1) == heads,
              "probs, pages and counts disagree on [B, H]");
  TORCH_CHECK(tokens_per_page > 0, "tokens_per_page must be positive");
  const int64_t page_bytes = arena.size(1), num_pages = arena.size(0);
  TORCH_CHECK(score_offset >= 0 && score_stride >= static_cast<int64_t>(sizeof(float)) &&
                  score_offset + tokens_per_page * score_stride <= page_bytes,
              "the score field lies outside the page");
  const auto pg = pages.accessor<int64_t, 3>();
  const auto cnt = counts.accessor<int64_t, 2>();
  for (int64_t item = 0; item < batch * heads; ++item) {
    const int64_t count = cnt[item / heads][item % heads];
    TORCH_CHECK(count >= 0 && count <= width, "a head holds ", count,
                " tokens, outside the probabilities' ", width, " columns");
    TORCH_CHECK(count <= pages.size(2) * tokens_per_page, "a head holds more tokens than pages");
    for (int64_t c = 0; c * tokens_per_page < count; ++c) {
      const int64_t page = pg[item / heads][item % heads][c];
      TORCH_CHECK(page >= 0 && page < num_pages, "page id ", page, " outside the arena");
    }
  }
  const float* p = probs.data_ptr<float>();
  const int64_t stride_b = probs.stride(0), stride_h = probs.stride(1), stride_g = probs.stride(2);
  const auto scale = rescale.accessor<float, 3>();
  uint8_t* base = arena.data_ptr<uint8_t>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(static_cast<size_t>(group));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, h = item % heads;
      const int64_t count = cnt[b][h];
      const float* rows = p + b * stride_b + h * stride_h;
      for (int64_t g = 0; g < group; ++g) {
        sc[g] = scale[b][h][g];
      }
      // Page by page: each page's score field is one strided run of floats.
      for (int64_t first = 0; first < count; first += tokens_per_page) {
        uint8_t* field = base + pg[b][h][first / tokens_per_page] * page_bytes + score_offset;
        const int64_t n = std::min(tokens_per_page, count - first);
        for (int64_t t = 0; t < n; ++t) {
          const float* col = rows + first + t;
          float top = col[0] * sc[0];
          for (int64_t g = 1; g < group; ++g) {
            top = std::max(top, col[g * stride_g] * sc[g]);
          }
          uint8_t* at = field + t * score_stride;
          float score;
          std::memcpy(&score, at, sizeof score);
          score += top;
          std::memcpy(at, &score, sizeof score);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierkv, m) {
  m.def(
      "add_scores(Tensor probs, Tensor rescale, Tensor(a!) arena, Tensor pages, Tensor counts, "
      "int score_offset, int score_stride, int tokens_per_page) -> ()");
}

TORCH_LIBRARY_IMPL(tierkv, CPU, m) {
  m.impl("add_scores", &add_scores);
}
