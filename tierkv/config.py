"""Engine configuration and the parsing of human-readable sizes such as ``"4GiB"``."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Set to 1 to allow a max_model_len beyond the model's positions (vLLM's
# VLLM_ALLOW_LONG_MAX_MODEL_LEN), for the CLI where no config field is at hand.
ALLOW_LONG_ENV = "TIERKV_ALLOW_LONG_MAX_MODEL_LEN"
# 1 or 0 turns batch-invariant mode on or off where ``batch_invariant`` is left unset (vLLM's
# VLLM_BATCH_INVARIANT), e.g. for ``tierkv bench``, which builds engines without that flag.
BATCH_INVARIANT_ENV = "TIERKV_BATCH_INVARIANT"


def parse_size(value: int | str) -> int:
    """Parse a byte count: an int, or a string such as ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"cannot parse size {value!r}: use bytes or a number with one of "
            "B, KB, MB, GB, KiB, MiB, GiB, TiB (e.g. '2GiB')"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


@dataclass
class EngineConfig:
    """Everything that shapes one engine instance.

    Attributes:
        model: a local Hugging Face model folder, a ``.gguf`` file or ``smollm2``
            (resolved by ``tierkv.model.source.resolve_model``).
        dtype: compute dtype of the weights and activations; ``auto`` picks the fastest
            measured choice for the device (see ``resolve_dtype``).
        kv_cache_memory: bytes given to the KV page pool (int or string such as ``"2GiB"``).
        max_model_len: longest sequence (prompt + output); defaults to the model's
            ``max_position_embeddings``, and may not exceed it unless
            ``allow_long_max_model_len`` (see ``resolve_max_model_len``).
        max_num_seqs: most requests running at once.
        max_num_batched_tokens: token budget of one engine step (prefill chunks + decodes).
        seed: seed of the engine's sampler for requests that carry no seed of their own.
        kv_policy: KV cache policy of requests that do not choose one: ``default`` (the
            compressing differentiated policy tuned on the demo model, see
            ``tierkv.kv.policy.spec``) unless set; ``fp16`` keeps the cache uncompressed.
        kv_budget: budget mode: KV bytes per request as a fraction of fp16's. It applies to
            ``kv_policy``'s tiers when that policy is tiered, else to ``default``'s.
        page_bytes: size of one KV page; ``None`` sizes it from the head dim.
        attention_backend: a chain of attention backends (``tierkv.kv.backends``): ``fast``
            (the default: per KV format the first of ``cpu``, the C++ kernels that read the
            pages in place, ``torch``, fused torch ops, and ``reference`` that serves it),
            ``cpu``, ``torch``, ``triton`` (CUDA tensors, or CPU tensors in Triton's
            interpreter), or ``reference`` (gather, dequantize, attend; what the tests
            trust). A format a backend lacks falls back to ``reference``.
        allow_long_max_model_len: accept a ``max_model_len`` beyond the model's positions
            (also set by the environment variable ``TIERKV_ALLOW_LONG_MAX_MODEL_LEN=1``).
        batch_invariant: compute each token's logits bit for bit as they would be computed
            alone, whatever else shares its engine step, so a seeded sampled request gives
            the same output alone or inside any batch (vLLM's ``VLLM_BATCH_INVARIANT=1``):
            every linear layer goes through one native kernel whose per-row sums do not
            depend on the row count (``layers.linear``). ``None`` (the default) means the
            environment variable ``TIERKV_BATCH_INVARIANT`` (1 or 0) where set, else on in
            bfloat16 with the native kernels built (where it costs a few percent) and off
            otherwise: float32 pays about 25-30% for it, float16 far more (no native
            kernel: one row at a time). Off, a row's rounding may follow its batch (see
            ``tierkv.sampling``).
        enable_prefix_caching: reuse the KV pages of prompt prefixes that earlier requests
            computed (vLLM's automatic prefix caching, on by default as in its v1 engine):
            content-addressed full pages, shared by reference, evicted least recently used
            when free pages run out. Uncompressed policies share at any page; quantized and
            tiered ones only at the fixed prompt cuts of batch-invariant mode, tiered ones by
            copy (see ``docs/prefix_caching.md``).
    """

    model: str
    dtype: str = "auto"
    kv_cache_memory: int | str = "1GiB"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    seed: int = 0
    kv_policy: str = "default"
    kv_budget: float | None = None
    page_bytes: int | None = None
    attention_backend: str = "fast"
    allow_long_max_model_len: bool = False
    batch_invariant: bool | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        counts = {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        if self.max_model_len is not None:
            counts["max_model_len"] = self.max_model_len
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise ValueError(f"kv_budget must be in (0, 1], got {self.kv_budget}")

    def resolve_max_model_len(self, model_positions: int) -> int:
        """The longest sequence to serve for a model trained on ``model_positions`` positions.

        Beyond them the model's outputs are untrained territory (positions it never saw), so
        as vLLM does, a longer ``max_model_len`` is refused unless explicitly allowed.
        """
        if self.max_model_len is None:
            return model_positions
        from_env = os.environ.get(ALLOW_LONG_ENV, "").lower() in ("1", "true")
        allowed = self.allow_long_max_model_len or from_env
        if self.max_model_len > model_positions and not allowed:
            raise ValueError(
                f"max_model_len={self.max_model_len} is longer than the model's "
                f"{model_positions} positions (max_position_embeddings); outputs past them "
                f"are unreliable. Lower it, or allow it with allow_long_max_model_len=True "
                f"or the environment variable {ALLOW_LONG_ENV}=1"
            )
        return self.max_model_len

    def resolve_batch_invariant(self, cheap: bool) -> bool:
        """Whether batch-invariant mode is on: ``batch_invariant`` when set, else the
        environment variable ``TIERKV_BATCH_INVARIANT`` (1/true or 0/false) when set, else
        ``cheap`` (the engine's word on whether its dtype gets the mode at little cost)."""
        if self.batch_invariant is not None:
            return bool(self.batch_invariant)
        from_env = os.environ.get(BATCH_INVARIANT_ENV, "").strip().lower()
        if from_env in ("1", "true"):
            return True
        if from_env in ("0", "false"):
            return False
        return cheap

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build a config from keyword arguments, refusing unknown names."""
        known = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(known))}"
            )
        return cls(model=model, **kwargs)
