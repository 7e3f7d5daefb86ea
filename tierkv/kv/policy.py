"""KVPolicy: which precision each cached token gets, and which tokens are kept at all.

A policy is named by a string (``--kv-policy``, or ``SamplingParams(kv_policy=...)`` for one
request):

- ``fp16``: the uncompressed baseline. Every token is kept, keys and values in the model's
  compute dtype (2 bytes per element in bf16/fp16, 4 in float32, so that float32 runs match
  Hugging Face exactly). ``full`` is accepted as another name for it.
- ``kXvY`` for every quantized format of ``tierkv.kv.quant.FORMATS`` (``k8v8``, ``k8v4``,
  ``k4v4``, ``k4v2``...): every token is kept, keys quantized to X bits and values to Y bits,
  group-wise per token and KV head. An optional suffix ``-gN`` sets the group size to N
  channels (``k4v2-g64``); the default is ``quant.DEFAULT_GROUP_SIZE``.

Bytes per token (``KVStore.bytes_per_token``): a page of ``page_bytes`` holds
``tokens_per_page`` tokens of one (request, layer, KV head) in one format, and its page-table
entry costs 8 bytes (int64), so one token costs, over all layers and KV heads::

    num_layers * num_kv_heads * (page_bytes + 8) / tokens_per_page(format)

``tokens_per_page`` already accounts for every per-token field (codes, fp16 scales and zeros,
the f32 score, the i32 position) and the page's alignment waste; the measured use of a request
exceeds this only by its partly filled last page per head.

Uniform policies are deterministic per token (a token's codes depend on its own key and value
only), so a preempted request recomputes exactly the cache it had and its output is unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tierkv.kv.quant import FORMATS, FULL, KVFormat

_FP16_NAMES = ("fp16", FULL.name)
_QUANTIZED_NAMES = tuple(name for name, fmt in FORMATS.items() if fmt.quantized)
SUPPORTED_POLICIES = ("fp16", *_QUANTIZED_NAMES)

_UNIFORM = re.compile(r"(?P<format>k\d+v\d+)(?:-g(?P<group>\d+))?")


@dataclass(frozen=True)
class KVPolicy:
    """A parsed KV policy: the storage format of kept tokens.

    Attributes:
        name: the canonical spelling (``fp16``, ``k4v2``, ``k4v2-g64``).
        high: the format every kept token is stored in.
    """

    name: str
    high: KVFormat

    @classmethod
    def parse(cls, spec: str | KVPolicy) -> KVPolicy:
        """Parse a policy name such as ``"fp16"`` or ``"k8v4-g64"``.

        Unknown names raise ``ValueError`` listing the supported ones.
        """
        if isinstance(spec, KVPolicy):
            return spec
        name = spec.strip().lower()
        if name in _FP16_NAMES:
            return cls(name="fp16", high=FULL)
        match = _UNIFORM.fullmatch(name)
        if match and match["format"] in _QUANTIZED_NAMES:
            fmt = FORMATS[match["format"]]
            if match["group"] is None:
                return cls(name=fmt.name, high=fmt)
            group = int(match["group"])
            if group < 1:
                raise ValueError(f"KV policy {spec!r}: the group size must be positive")
            return cls(name=f"{fmt.name}-g{group}", high=fmt.with_group_size(group))
        raise ValueError(
            f"unknown KV policy {spec!r}; supported: {', '.join(SUPPORTED_POLICIES)} "
            "(quantized ones optionally with a group size suffix such as k4v2-g64)"
        )
