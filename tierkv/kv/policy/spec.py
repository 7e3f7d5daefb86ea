"""KVPolicy: which precision each cached token gets, and which tokens are kept at all.

A policy is named by a string (``--kv-policy``, or ``SamplingParams(kv_policy=...)`` for one
request):

- ``fp16``: the uncompressed baseline. Every token is kept, keys and values in the model's
  compute dtype (2 bytes per element in bf16/fp16, 4 in float32, so that float32 runs match
  Hugging Face exactly). ``full`` is accepted as another name for it.
- ``kXvY`` for every quantized format of ``tierkv.kv.formats.quant.FORMATS`` (``k8v8``, ``k8v4``,
  ``k4v4``, ``k4v2``...): every token is kept, keys quantized to X bits and values to Y bits,
  group-wise per token and KV head. An optional suffix ``-gN`` sets the group size to N
  channels (``k4v2-g64``); the default is ``quant.DEFAULT_GROUP_SIZE``. A uniform policy keeps
  a full-precision *residual* of the newest ``r`` tokens (``k8v8:r=32``, the default 32;
  ``r=0`` for none), see docs/kv_policies.md.
- Every quantized policy stores its keys and values in a rotated basis (``h=1``, the default;
  ``k4v4:h=0`` or ``default:h=0`` stores them as the model computes them), where outlier
  channels no longer set every group's scale (``tierkv.kv.formats.rotation``). Attention is
  unchanged by the rotation itself; only the quantization error shrinks. On SmolLM2's dev
  prompts it cut the KL to the uncompressed cache by 40-50% for ``default``, ``k4v4``,
  ``k4v2`` and ``k8v8/k4v4`` (docs/fidelity.md).
- ``HIGH/LOW``, differentiated (``k8v4/k4v2``): each (request, layer, KV head) keeps a token in
  the high tier, demotes it to the low tier, or prunes it, by the attention it receives. The low
  format may not have more key or value bits than the high one. The full syntax is
  ``HIGH[-gN]/LOW[-gN][@BUDGET][:key=value,...]`` (a group size after HIGH sets the high
  tier's alone) with keys ``r`` (full-precision residual window, 0; at most ``w``, see
  ``tierkv.kv.backends.tiered_ring``), ``ah`` (alpha_high, default 2.0),
  ``al`` (alpha_low, 0.2), ``w`` (protected recent window, 64 tokens), ``sw`` (prefill
  scoring window, 64 queries), ``pk`` (prefill score pooling kernel, odd, 1 = none; 7) and
  ``di`` (decision interval in decode steps; 8, and 1 in budget mode),
  e.g. ``k8v4/k4v2-g64:ah=1.0,al=0.02,w=64,pk=1`` (DiffKV's published thresholds). The
  defaults were tuned on the demo model's dev split (``docs/fidelity.md``).
- ``@BUDGET`` (a fraction in (0, 1], ``k8v4/k4v2@0.2``): budget mode (docs/kv_policies.md).
- ``default``: the engine's compressing default (``EngineConfig.kv_policy``),
  ``k8v8/k4v2-g64:ah=1,al=0.8,w=128,pk=15,r=32``; it takes the same suffixes (``default@0.2``,
  ``default:w=32``, ``default-g32``), whose parameters override its own. Why these values, as
  measured on SmolLM2-135M-Instruct's dev prompts (``docs/fidelity.md``): a token's value
  error enters the output weighted by its attention, so the high tier keeps 8-bit values for
  the tokens that get most (the sinks, the newest 128; ``ah=1``, DiffKV's value, keeps those
  above average), and the newest 32 are also read uncompressed from a residual ring
  (``r=32``). Prefill scores are max-pooled over 15 positions and tokens under ``0.8 / N``
  pruned (``pk=15,al=0.8``): the pooling keeps the neighbours of an attended token (the digits
  after "the magic number is"), where ``pk=7,al=0.2`` pruned half the dev needles at 1k-2k
  tokens for the same bytes. At 4k-token contexts it stores 4.1x fewer bytes per token than
  the uncompressed bf16 cache.

Scores. A query *counts* when its position is at least ``prompt_len - sw`` (``prompt_len`` is
the length at admission): the last ``sw`` prompt queries and every decode query. Each counting
query adds to every token it sees the attention it gives it, max over the query heads sharing
the token's KV head (over a prefill chunk: the max over heads of the chunk's sums). A token's
score is the mean over the counting queries that could see it,
``sum / (N - max(prompt_len - sw, pos))`` with ``N`` the tokens seen so far: at the end of the
prompt this is the prefill score, afterwards the running mean since the token arrived. With
``pk > 1`` the attention a prefill chunk gives is max-pooled over ``pk`` neighbouring positions
before it is added, so that the tokens around an attended one (the value after a key, the rest
of an identifier) are scored with it, as SnapKV pools its scores; decode scores are not pooled.

Decisions, per (request, layer, KV head), once the prompt is complete and then after every
``di``-th decode step (when ``N - prompt_len`` is a multiple of ``di``: a property of the
request alone, so batching does not move them), with ``N`` tokens seen: the newest ``w`` tokens
stay high; a high token with mean ``>= ah / N`` stays high, one with ``al / N <= mean < ah / N``
is demoted (dequantized and re-quantized to the low format), one below ``al / N`` is pruned; a
low token below ``al / N`` is pruned. Low tokens are never promoted. Heads therefore hold
different numbers of tokens, and pages emptied by demotion and pruning return to the pool at
once. With ``di > 1``, tokens between decisions only gather scores and new tokens join the high
tier, and a token waits at most ``di - 1`` steps longer for its demotion. Scores are added in
place at every step (by ``native.tiered_decode`` on the native decode), and a step's decisions run
once for all layers after its last one, over only the requests whose decision step it is, so
the other steps pay nothing for decisions. The default ``di=8`` left the dev split's fidelity
where ``di=1`` had it (ppl ratio 1.0050 against 1.0051, KL 0.0040, the same retrieval; ``di=16``
1.0072) and took a decode step of 32 requests x 1536 tokens from 20.1 to 12.8 ms
(BENCHMARKS.md).

Budget mode's rule, bytes per token, the residual window of uniform policies and what
preemption does to each kind of policy: docs/kv_policies.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from tierkv.kv.formats.quant import FORMATS, FULL, KVFormat

_FP16_NAMES = ("fp16", FULL.name)
_QUANTIZED_NAMES = tuple(name for name, fmt in FORMATS.items() if fmt.quantized)
DEFAULT_TIERS = "k8v8/k4v2"
# Parameters of ``default`` (before any the name adds, which override them); see above.
DEFAULT_TIERED_RESIDUAL = 32
DEFAULT_PARAMS = f"ah=1,al=0.8,w=128,pk=15,r={DEFAULT_TIERED_RESIDUAL}"
# The group size of ``default`` unless its name sets one: 64 channels halve the scale/zero
# bytes of 32, which the tuning sweep preferred (see docs/fidelity.md).
DEFAULT_GROUP = 64
SUPPORTED_POLICIES = ("fp16", *_QUANTIZED_NAMES)
"""The uniform policy names; tiered ones are written ``HIGH/LOW`` (see the module docstring)."""

_UNIFORM = re.compile(r"(?P<format>k\d+v\d+)(?:-g(?P<group>\d+))?(?::(?P<params>.*))?")
_TIERED = re.compile(
    r"(?P<high>k\d+v\d+)(?:-g(?P<high_group>\d+))?/(?P<low>k\d+v\d+)(?:-g(?P<group>\d+))?"
    r"(?:@(?P<budget>[0-9]*\.?[0-9]+))?(?::(?P<params>.*))?"
)
# Parameter keys of the string syntax -> KVPolicy fields, for tiered and uniform policies.
_PARAMS = {
    "ah": "alpha_high",
    "al": "alpha_low",
    "w": "recent",
    "sw": "score_window",
    "pk": "pool",
    "di": "interval",
    "r": "residual",
    "h": "rotate",
}
_UNIFORM_PARAMS = {"r": "residual", "h": "rotate"}
_INT_PARAMS = ("recent", "score_window", "pool", "residual", "interval", "rotate")
_PARAM_NAMES = {
    "alpha_high": "alpha_high",
    "alpha_low": "alpha_low",
    "recent": "recent window",
    "score_window": "score window",
    "pool": "prefill score pooling kernel",
    "interval": "decision interval",
    "residual": "full-precision residual window",
    "rotate": "Hadamard rotation, 1 or 0",
}
# The residual window of uniform quantized policies unless ``:r=`` sets it.
DEFAULT_RESIDUAL = 32
_SYNTAX = (
    "supported: fp16, {uniform} (optionally with a group size suffix such as k4v2-g64 and a "
    "residual window such as k8v8:r=32), "
    "HIGH/LOW tiers such as k8v4/k4v2 written "
    "HIGH[-gN]/LOW[-gN][@BUDGET][:ah=2.0,al=0.2,w=64,sw=64,pk=7,di=8,r=0,h=1], "
    "and default (= k8v8/k4v2-g64:ah=1,al=0.8,w=128,pk=15,r=32, same suffixes)"
)


@dataclass(frozen=True)
class KVPolicy:
    """A parsed KV policy.

    Attributes:
        name: the canonical spelling (``fp16``, ``k4v2-g64``, ``k8v4/k4v2@0.2``).
        high: the format of kept tokens (of the high tier when tiered).
        low: the low tier's format; ``None`` for uniform policies (every token kept in ``high``).
        residual: the newest tokens also kept uncompressed (uniform quantized policies, and
            tiered ones with ``r``, where it may not exceed the recent window ``w``).
        alpha_high: a token stays high while its mean score is at least ``alpha_high / N``.
        alpha_low: below ``alpha_low / N`` a token is pruned (threshold mode only).
        recent: the newest tokens always kept high.
        score_window: the last prompt queries that score tokens at prefill.
        pool: width of the max-pooling of prefill scores over neighbouring positions (1: none).
        interval: decode steps between decisions (1: after every step).
        budget: fraction of fp16 bytes each head may hold (budget mode), or ``None``.
        rotate: quantized tokens are stored in a rotated basis (``tierkv.kv.formats.rotation``;
            ``h=0`` turns it off).
    """

    name: str
    high: KVFormat
    low: KVFormat | None = None
    residual: int = 0
    alpha_high: float = 2.0
    alpha_low: float = 0.2
    recent: int = 64
    score_window: int = 64
    pool: int = 7
    interval: int = 8
    budget: float | None = None
    rotate: bool = True

    @property
    def tiered(self) -> bool:
        """Whether tokens are scored and split into tiers (else every token is kept)."""
        return self.low is not None

    @classmethod
    def parse(cls, spec: str | KVPolicy) -> KVPolicy:
        """Parse a policy string (see the module docstring for the syntax).

        Unknown or malformed names raise ``ValueError`` listing what is supported.
        """
        if isinstance(spec, KVPolicy):
            return spec
        name = spec.strip().lower()
        if name in _FP16_NAMES:
            return cls(name="fp16", high=FULL, rotate=False)
        if name.startswith("default"):
            head, _, params = name[len("default") :].partition(":")
            group = "" if head.startswith("-g") else f"-g{DEFAULT_GROUP}"
            # Later parameters win (``_params``), so the name's own override the default's.
            extra = f",{params}" if params else ""
            keys = dict(item.partition("=")[::2] for item in params.split(",") if item)
            if "w" in keys and "r" not in keys and keys["w"].isdigit():
                # A recent window narrower than the default ring narrows the ring with it.
                extra += f",r={min(int(keys['w']), DEFAULT_TIERED_RESIDUAL)}"
            name = f"{DEFAULT_TIERS}{group}{head}:{DEFAULT_PARAMS}{extra}"
        match = _UNIFORM.fullmatch(name)
        if match and match["format"] in _QUANTIZED_NAMES:
            fmt = _grouped(spec, FORMATS[match["format"]], match["group"])
            suffix = f"-g{fmt.group_size}" if match["group"] else ""
            values = {"residual": DEFAULT_RESIDUAL, **_params(spec, match, _UNIFORM_PARAMS)}
            if values["residual"] < 0:
                raise ValueError(f"KV policy {spec!r}: need r >= 0")
            changed = [f"r={values['residual']}"] if values["residual"] != DEFAULT_RESIDUAL else []
            changed += ["h=0"] if not values.get("rotate", True) else []
            suffix += ":" + ",".join(changed) if changed else ""
            return cls(name=fmt.name + suffix, high=fmt, **values)  # type: ignore[arg-type]
        match = _TIERED.fullmatch(name)
        if match and match["high"] in _QUANTIZED_NAMES and match["low"] in _QUANTIZED_NAMES:
            return cls._tiered(spec, match)
        raise ValueError(f"unknown KV policy {spec!r}; " + _SYNTAX.format(uniform=_uniform_list()))

    @classmethod
    def _tiered(cls, spec: str, match: re.Match[str]) -> KVPolicy:
        # A group size after the low format sets both tiers'; one after the high format, the
        # high tier's alone (``k8v8-g32/k4v2-g64``).
        high = _grouped(spec, FORMATS[match["high"]], match["high_group"] or match["group"])
        low = _grouped(spec, FORMATS[match["low"]], match["group"])
        if low.key_bits > high.key_bits or low.value_bits > high.value_bits or low == high:
            raise ValueError(
                f"KV policy {spec!r}: the low tier must have fewer bits than the high tier "
                "(keys and values each no more)"
            )
        values = _params(spec, match, _PARAMS)
        budget = float(match["budget"]) if match["budget"] else None
        values.setdefault("interval", _default_interval(budget))
        policy = cls(name="", high=high, low=low, budget=budget, **values)  # type: ignore[arg-type]
        policy._validate(spec)
        grouped = match["group"] or match["high_group"]
        return replace(policy, name=policy._canonical(grouped))

    def with_budget(self, fraction: float) -> KVPolicy:
        """This tiered policy in budget mode at ``fraction`` of fp16 bytes."""
        if not self.tiered:
            raise ValueError(f"a KV budget needs a tiered policy such as default, not {self.name}")
        base = self.name.split(":")[0].split("@")[0]
        params = self.name.partition(":")[2]
        return KVPolicy.parse(f"{base}@{fraction:g}" + (f":{params}" if params else ""))

    def _validate(self, spec: str) -> None:
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"KV policy {spec!r}: the budget must be a fraction in (0, 1]")
        if not 0 <= self.alpha_low <= self.alpha_high:
            raise ValueError(f"KV policy {spec!r}: need 0 <= al <= ah")
        if self.recent < 0 or self.score_window < 1:
            raise ValueError(f"KV policy {spec!r}: need w >= 0 and sw >= 1")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"KV policy {spec!r}: the pooling kernel pk must be odd and >= 1")
        if self.interval < 1:
            raise ValueError(f"KV policy {spec!r}: the decision interval di must be >= 1")
        if not 0 <= self.residual <= self.recent:
            # The ring copies the newest tokens of the high tier; within the recent window they
            # are never demoted or pruned, so a ring entry always has its tier token.
            raise ValueError(f"KV policy {spec!r}: need 0 <= r <= w (the recent window)")

    def _canonical(self, group: str | None) -> str:
        assert self.low is not None
        suffix = f"-g{self.low.group_size}" if group else ""
        high = self.high.name
        if self.high.group_size != self.low.group_size:
            high += f"-g{self.high.group_size}"
        name = f"{high}/{self.low.name}{suffix}"
        if self.budget is not None:
            name += f"@{self.budget:g}"
        defaults = KVPolicy(name="", high=self.high, interval=_default_interval(self.budget))
        changed = [
            f"{key}={getattr(self, field):g}"
            for key, field in _PARAMS.items()
            if getattr(self, field) != getattr(defaults, field)
        ]
        return name + (":" + ",".join(changed) if changed else "")


def _default_interval(budget: float | None) -> int:
    """``di`` when not given: 8, but 1 in budget mode, whose byte cap then holds at every step."""
    return 8 if budget is None else 1


def _params(spec: str, match: re.Match[str], keys: dict[str, str]) -> dict[str, float | int]:
    """The ``:key=value,...`` parameters of a policy string, as KVPolicy field values."""
    values: dict[str, float | int] = {}
    for item in filter(None, (match["params"] or "").split(",")):
        key, _, value = item.partition("=")
        field = keys.get(key.strip())
        if field is None or not value:
            known = ", ".join(f"{k} ({_PARAM_NAMES[f]})" for k, f in keys.items())
            raise ValueError(
                f"KV policy {spec!r}: unknown parameter {item!r}; use key=value with keys {known}"
            )
        try:
            values[field] = int(value) if field in _INT_PARAMS else float(value)
        except ValueError as err:
            raise ValueError(f"KV policy {spec!r}: bad value in {item!r}") from err
        if field == "rotate":
            if values[field] not in (0, 1):
                raise ValueError(f"KV policy {spec!r}: h is 1 (rotate) or 0, not {value}")
            values[field] = bool(values[field])
    return values


def _grouped(spec: str, fmt: KVFormat, group: str | None) -> KVFormat:
    if group is None:
        return fmt
    if int(group) < 1:
        raise ValueError(f"KV policy {spec!r}: the group size must be positive")
    return fmt.with_group_size(int(group))


def _uniform_list() -> str:
    return ", ".join(_QUANTIZED_NAMES)
