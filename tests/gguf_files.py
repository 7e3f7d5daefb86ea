"""Small GGUF files written by the tests with ``gguf.GGUFWriter``, as llama.cpp converts models."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM


def permute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``): each
    head's two rotary halves interleaved, which a GGUF loader must undo."""
    if heads != kv_heads:
        heads = kv_heads
    shape = weights.shape
    return (
        weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def write_llama_gguf(checkpoint: Path, out: Path, chat_template: str | None = None) -> Path:
    """Convert the fp32 llama checkpoint in ``checkpoint`` (with a byte-level BPE tokenizer) to
    an F32 GGUF at ``out``: its weights are then exactly the checkpoint's."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    cfg = model.config
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(writer, checkpoint, cfg.eos_token_id, chat_template)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, _, suffix = name.rpartition(".")
        data = tensor.numpy()
        if base.endswith("q_proj"):
            data = permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            data = permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(f"{table.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    _finish(writer)
    return out


def write_header_only_gguf(
    out: Path,
    arch: str,
    tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    **strings: str,
) -> Path:
    """A GGUF with one 4 x 256 tensor of ``tensor_type`` (zeros) and the ``strings`` as
    metadata: enough for the checks that refuse a file before anything loads it."""
    writer = gguf.GGUFWriter(out, arch)
    for key, value in strings.items():
        writer.add_string(key, value)
    block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    writer.add_tensor(
        "token_embd.weight",
        np.zeros((4, 256 // block * type_size), np.uint8),
        raw_dtype=tensor_type,
    )
    _finish(writer)
    return out


def _add_tokenizer(
    writer: gguf.GGUFWriter, checkpoint: Path, eos: int, chat_template: str | None
) -> None:
    # The checkpoint's BPE as a llama.cpp "gpt2" vocabulary: tokens by id, merges, and the
    # added tokens marked as control tokens (type 3).
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    # BOS = EOS as in GPT-2 (transformers 5.2's converter fails on a GGUF without a BOS id),
    # never added to prompts.
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
