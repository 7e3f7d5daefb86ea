"""Local Hugging Face checkpoints: ``config.json`` -> ModelSpec, safetensors (or the GGUF a
cached folder names, see ``tierkv.model.gguf``) -> parameters.

Architectures are looked up by the ``architectures`` field. Every config feature that changes
the numerics is either honoured or refused with an error naming what is supported: a model is
never run with silently wrong numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tierkv.model.gguf import gguf_source, read_tensors
from tierkv.model.layers import SUPPORTED_ROPE_TYPES, RopeConfig


@dataclass(frozen=True)
class ArchFlags:
    """What distinguishes one family's decoder from the others."""

    qkv_bias: bool | None  # None: read `attention_bias` from the config
    qk_norm: bool


ARCHITECTURES: dict[str, ArchFlags] = {
    "LlamaForCausalLM": ArchFlags(qkv_bias=None, qk_norm=False),
    "MistralForCausalLM": ArchFlags(qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": ArchFlags(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": ArchFlags(qkv_bias=None, qk_norm=True),
}


@dataclass(frozen=True)
class ModelSpec:
    """The shape and numerics of a decoder, as read from ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    torch_dtype: str | None


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Parse and validate ``config.json`` of a local model folder."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json in {model_dir}: expected a local Hugging Face model folder, "
            "a .gguf file, or smollm2"
        )
    cfg: dict[str, Any] = json.loads(path.read_text())
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or cfg.get('model_type')!r} in {path}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    flags = ARCHITECTURES[arch]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; supported: silu")
    if cfg.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=true; supported: MLPs without bias")
    heads = cfg["num_attention_heads"]
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope=_read_rope(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias if flags.qkv_bias is None else flags.qkv_bias,
        o_bias=attention_bias and arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"),
        qk_norm=flags.qk_norm,
        sliding_windows=_read_sliding_windows(cfg, arch),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


def _read_rope(cfg: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older checkpoints write
    # `rope_theta` plus an optional `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("unsupported partial_rotary_factor; supported: 1.0")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        **{k: params[k] for k in fields if params.get(k) is not None},
    )


def _read_sliding_windows(cfg: dict[str, Any], arch: str) -> tuple[int | None, ...]:
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        if arch == "Qwen2ForCausalLM":
            # Qwen2 slides only when asked, and only from `max_window_layers` on.
            on = bool(cfg.get("use_sliding_window")) and window is not None
            first = cfg.get("max_window_layers", layers)
            layer_types = [
                "sliding_attention" if on and i >= first else "full" for i in range(layers)
            ]
        else:
            layer_types = ["sliding_attention" if window else "full"] * layers
    if len(layer_types) != layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {layers} layers")
    unknown = set(layer_types) - {"sliding_attention", "full_attention", "full"}
    if unknown:
        raise ValueError(
            f"unsupported layer types {sorted(unknown)}; "
            "supported: full_attention, sliding_attention"
        )
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded (via its index)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return [root / s for s in shards]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir} "
        "(a folder's weights must be safetensors; pass a GGUF checkpoint as its .gguf file)"
    )


def checkpoint_targets(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name (without ``model.``) -> the tensor of ``module`` it fills.

    A fused layer (``fused_from``, see ``layers.fused_linear``) stands for several checkpoint
    projections: each of them fills a row slice of the fused weight and bias.
    """
    targets = {}
    for name, param in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        parts = getattr(module.get_submodule(owner), "fused_from", None)
        if parts is None:
            targets[name] = param.data
            continue
        parent = owner.rpartition(".")[0]
        start = 0
        for part, size in parts:
            targets[f"{parent}.{part}.{leaf}"] = param.data[start : start + size]
            start += size
    return targets


def load_weights(module: torch.nn.Module, model_dir: str | Path) -> None:
    """Copy checkpoint tensors into ``module``'s parameters, checking that none is missing.

    The tensors are safetensors, or the GGUF a cached folder names (``tierkv.model.gguf``),
    dequantized one tensor at a time; each is cast to the parameter's dtype as it is copied.
    """
    params = checkpoint_targets(module)
    loaded: set[str] = set()
    gguf = gguf_source(Path(model_dir))
    tensors = (
        read_tensors(gguf, Path(model_dir))
        if gguf is not None
        else _safetensors(model_dir, {f"model.{p}" for p in params} | set(params))
    )
    for name, tensor in tensors:
        target = name.removeprefix("model.")
        if target not in params:
            continue  # e.g. rotary inv_freq buffers saved by old exports
        param = params[target]
        if tensor.shape != param.shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(param.shape)}"
            )
        param.copy_(tensor.to(param.dtype))
        loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(f"checkpoint {model_dir} is missing weight tensors: {shown}")


def _safetensors(model_dir: str | Path, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``wanted`` tensors of a safetensors checkpoint, read one at a time."""
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in wanted:
                    yield name, f.get_tensor(name)
