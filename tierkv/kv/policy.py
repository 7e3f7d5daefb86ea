"""KVPolicy: which precision each cached token gets, and which tokens are kept at all.

A policy is named by a string (``--kv-policy``). ``fp16`` is the uncompressed baseline: every
token is kept, keys and values in the model's compute dtype (2 bytes per element in bf16/fp16,
4 in float32, so that float32 runs match Hugging Face exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

from tierkv.kv.quant import FULL, KVFormat

SUPPORTED_POLICIES = ("fp16",)


@dataclass(frozen=True)
class KVPolicy:
    """A parsed KV policy: the storage format of kept tokens."""

    name: str
    high: KVFormat

    @classmethod
    def parse(cls, spec: str | KVPolicy) -> KVPolicy:
        """Parse a policy name such as ``"fp16"``; unknown names list the supported ones."""
        if isinstance(spec, KVPolicy):
            return spec
        name = spec.strip().lower()
        if name == "fp16":
            return cls(name="fp16", high=FULL)
        raise ValueError(f"unknown KV policy {spec!r}; supported: {', '.join(SUPPORTED_POLICIES)}")
