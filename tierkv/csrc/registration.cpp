// The schema of every tierkv op, in one place: torch.ops.tierkv.<name>. Each kernel file holds
// only its implementation and registers it for its dispatch key (TORCH_LIBRARY_IMPL(tierkv,
// CPU, m), or CatchAll for the ops without a tensor argument, which nothing could dispatch
// on), so another backend's kernels (a CUDA build, say) register under the same names and
// schemas with TORCH_LIBRARY_IMPL(tierkv, CUDA, m).
//
// The library is built and loaded by tierkv/extension.py; loading it runs these registrations.
//
// Where the kernels live:
//   tierkv/kv/backends/cpu/csrc/paged_decode.cpp    kernel_bit_pairs, paged_decode, tiered_decode
//   tierkv/kv/backends/cpu/csrc/quantize_store.cpp  quantize_store, store_rows
//   tierkv/kv/backends/cpu/csrc/compact_tiers.cpp   compact_tiers
//   tierkv/kv/backends/cpu/csrc/flash_prefill.cpp   flash_prefill_supported, flash_prefill,
//                                                   flash_scores
//   tierkv/model/csrc/small_batch_linear.cpp        small_batch_linear, invariant_linear
//   tierkv/model/csrc/fused_elementwise.cpp         rms_norm, silu_and_mul, rotary
//   tierkv/kv/formats/csrc/hadamard.cpp             hadamard
// (the Python contracts: tierkv/kv/backends/cpu/ops.py, tiers.py, layout.py and writes.py,
// tierkv/kv/backends/partial.py, tierkv/model/layers.py, tierkv/kv/formats/rotation.py).

#include <torch/extension.h>

TORCH_LIBRARY(tierkv, m) {
  // --- KV cache: decode attention over the paged store (paged_decode.cpp) ---
  // The (key bits, value bits) pairs the decode kernels are instantiated for, as [k, v] lists.
  m.def("kernel_bit_pairs() -> int[][]");
  // Decode attention over quantized pages: (out [B, Hq, D] in q's dtype, lse [B, Hq] fp32).
  // With `ring`, the newest `residual` positions are read from uncompressed ring pages.
  m.def(
      "paged_decode(Tensor q, Tensor arena, Tensor pages, Tensor starts, Tensor ends, "
      "float sm_scale, int key_bits, int value_bits, int group_size, int[] offsets, "
      "int[] strides, int tokens_per_page, *, Tensor? ring=None, Tensor? ring_size=None, "
      "Tensor? residual=None, int[] ring_fields=[], int ring_tokens_per_page=1, "
      "str ring_dtype=\"float32\") -> (Tensor, Tensor)");
  // Decode attention over both tiers of tiered slots at one layer, merged: out [B, Hq, D] in
  // q's dtype. With `score` the probabilities are added to the stored scores in the arena;
  // else they are written to `probs`.
  m.def(
      "tiered_decode(Tensor q, Tensor(a!) arena, Tensor tables, Tensor counts, Tensor slots, "
      "int layer, Tensor query_pos, int window, float sm_scale, int[] formats, int[] offsets, "
      "int[] strides, bool score, Tensor(b!)? probs, int probs_split, *, "
      "Tensor? ring_size=None, Tensor? residual=None, int[] ring_fields=[], "
      "int ring_tokens_per_page=1, str ring_dtype=\"float32\") -> Tensor");

  // --- KV cache: writes (quantize_store.cpp) ---
  m.def(
      "quantize_store(Tensor k, Tensor v, Tensor positions, Tensor(a!) arena, Tensor pages, "
      "Tensor slots, int key_bits, int value_bits, int group_size, int[] offsets, "
      "int[] strides) -> ()");
  m.def(
      "store_rows(Tensor k, Tensor v, Tensor(a!) arena, Tensor pages, Tensor rows, "
      "int k_offset, int v_offset, int row_bytes) -> ()");

  // --- KV cache: compaction of the tiers (compact_tiers.cpp) ---
  m.def(
      "compact_tiers(Tensor(a!) arena, Tensor tables, Tensor counts, Tensor slots, int layer, "
      "Tensor keep_high, Tensor demote, Tensor keep_low, int[] high_format, int[] high_offsets, "
      "int[] high_strides, int low_tokens_per_page, int[] low_offsets, int[] low_strides) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // --- Prefill attention (flash_prefill.cpp) ---
  m.def("flash_prefill_supported() -> bool");
  m.def(
      "flash_prefill(Tensor q, Tensor k, Tensor v, int shift, int window, float sm_scale, "
      "Tensor? init_out=None, Tensor? init_lse=None) -> (Tensor, Tensor)");
  m.def(
      "flash_scores(Tensor q, Tensor k, Tensor lse, int shift, int window, float sm_scale) "
      "-> Tensor");

  // --- The rotated basis of quantized formats (hadamard.cpp) ---
  // x [..., D] through the block Walsh-Hadamard transform with column signs, times scale.
  m.def("hadamard(Tensor x, Tensor signs, float scale, bool signs_first) -> Tensor");

  // --- Model layers (small_batch_linear.cpp, fused_elementwise.cpp) ---
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("invariant_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

// The Python module torch's extension loader imports (tierkv/extension.py loads the build as
// one): it has no functions, importing it loads the library and so runs the registrations
// above and every kernel file's TORCH_LIBRARY_IMPL.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tierkv's C++ kernels; they are called as torch.ops.tierkv.<name>";
}
