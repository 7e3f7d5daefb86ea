"""One decoder for Llama, Mistral, Qwen2 and Qwen3, switched by the flags of a ModelSpec.

The decoder works on a flat list of tokens from many requests (no padding). Attention is
delegated to a callable that stores the step's keys and values and attends over what the KV
cache keeps, so the decoder knows nothing of pages or precisions.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from tierkv.batch import AttentionBatch
from tierkv.model.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    fused_linear,
    linear,
    pack_weight,
)
from tierkv.model.loader import ModelSpec


class AttentionBackend(Protocol):
    """Stores a layer's new keys/values and returns attention over the cache."""

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor: ...


class Attention(nn.Module):
    """Projections, optional q/k norm and rotary; the attention itself is the backend's."""

    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
        )
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.split = (q_out, kv_out, kv_out)
        parts = (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out))
        self.qkv_proj = fused_linear(spec.hidden_size, parts, bias=spec.qkv_bias, dtype=dtype)
        self.o_proj = Linear(q_out, spec.hidden_size, bias=spec.o_bias, dtype=dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
        self.qk_norm = spec.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: AttentionBackend,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, rope)
        out = attend(self.layer, q, k, v, batch)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, layer, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: AttentionBackend,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attend, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The whole causal LM; parameter names follow Hugging Face's without the ``model.`` prefix."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, dtype) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope)
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        # The tied output head's oneDNN copy of the embedding table (``prepack``).
        self.head_packed: torch.Tensor | None = None
        # Batch-invariant mode (``set_batch_invariant``), for the tied head.
        self.invariant = False
        self.requires_grad_(False)

    def prepack(self) -> None:
        """After the weights are loaded: every linear layer, and the output head, computed over
        oneDNN's layout of its weight (``layers.Linear.prepack``). A tied head keeps the
        embedding table, which the input still reads, and packs a copy."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()
        if self.spec.tie_word_embeddings:
            self.head_packed = pack_weight(self.embed_tokens.weight)

    def set_batch_invariant(self) -> None:
        """Instead of ``prepack``: every linear layer and the output head computed so that a
        token's result does not depend on the other tokens of its step (``layers.linear``'s
        ``invariant``). The weights stay row-major and unpacked. The other per-token ops
        (RMSNorm, SiLU product, rotary, embedding) already compute each row alone."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.set_invariant()
        self.invariant = True

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: AttentionBackend,
        batch: AttentionBatch,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Run tokens ``input_ids`` [N]; return float32 logits of the rows ``logits_rows``."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, attend, batch)
        x = self.norm(x[logits_rows])
        if self.spec.tie_word_embeddings:
            return linear(
                x, self.embed_tokens.weight, packed=self.head_packed, invariant=self.invariant
            ).float()
        return self.lm_head(x).float()
