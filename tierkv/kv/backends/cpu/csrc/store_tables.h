// The KV store's tensors as the kernels that take them whole check them: the arena of pages,
// the page tables [S, L, H, 3, P] (three rows per (slot, layer, head): the high tier, the low
// tier and the residual ring; P columns of page ids) and the tiers' token counts [S, L, H, 2]
// (high, low), laid out by tierkv/kv/store/tables.py. Shared by paged_decode.cpp and
// compact_tiers.cpp.

#pragma once

#include <torch/extension.h>

inline void check_store_tables(const at::Tensor& arena, const at::Tensor& tables,
                               const at::Tensor& counts) {
  TORCH_CHECK(arena.dim() == 2 && arena.scalar_type() == at::kByte && arena.is_contiguous(),
              "arena must be a contiguous uint8 [pages, page_bytes] tensor");
  TORCH_CHECK(tables.dim() == 5 && tables.size(3) == 3 && tables.scalar_type() == at::kLong &&
                  tables.is_contiguous(),
              "tables must be the store's contiguous int64 [S, L, H, 3, P]");
  TORCH_CHECK(counts.dim() == 4 && counts.size(0) == tables.size(0) &&
                  counts.size(1) == tables.size(1) && counts.size(2) == tables.size(2) &&
                  counts.size(3) == 2 && counts.scalar_type() == at::kLong &&
                  counts.is_contiguous(),
              "counts must be the store's contiguous int64 [S, L, H, 2]");
}
