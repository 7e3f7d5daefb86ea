"""SamplingParams (vLLM's names and defaults) and the batched sampler.

Each request samples with its own ``torch.Generator`` (seeded from ``seed`` when given), and
the random draw of a step depends only on that generator and the request's own logits. A
seeded request therefore gives the same output alone or inside any batch exactly when its
logits do not depend on the batch, which is the engine's batch-invariant mode
(``EngineConfig.batch_invariant``, ``--batch-invariant``, vLLM's ``VLLM_BATCH_INVARIANT=1``):
every linear layer through one kernel whose per-token sums ignore the other tokens, and
prompts cut at fixed positions. It is on by default in bfloat16 (the default dtype) and off
by default in float32 and float16, where it costs more (see README). With it off, a token's
rounding can follow the batch size (oneDNN picks its blocking from the whole product), and
in bfloat16 that changes seeded samples (2 of 12 matched alone vs in a 16-request batch);
float32's differences are about 1e-7 and rarely change a sample, but nothing promises it.
The same holds with the mode on for the same engine configuration only (dtype, KV policy,
attention backend, token budget), on the same machine and build, and not across a
preemption (a preempted request recomputes its tokens in prefill chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tierkv.structured.bitmask import mask_logits
from tierkv.structured.matcher import GrammarMatcher
from tierkv.structured.params import StructuredOutputsParams
from tierkv.validate import finite_float, int64


@dataclass
class SamplingParams:
    """How to sample one request's completion.

    Attributes follow vLLM: ``temperature`` 0 means greedy; ``top_k`` 0 or -1 means all tokens;
    ``stop`` strings are matched on the detokenized text and excluded from the output;
    ``logprobs`` asks for the top-N log-probabilities of each generated token (plus the
    sampled one); ``n`` completions are generated per prompt. ``structured_outputs``
    constrains the output to a JSON schema or to any JSON object (``StructuredOutputsParams``).
    ``prefix_caching`` False keeps the request out of the prefix cache (it neither reuses nor
    adds pages); ``cache_salt`` (vLLM's) shares cached pages only with requests of the same
    salt, so tenants cannot probe each other's prompts through timing.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    kv_policy: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    prefix_caching: bool = True
    cache_salt: str | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = [int64("stop_token_ids", t) for t in self.stop_token_ids or []]
        self._normalize()
        self._validate()
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")

    def _normalize(self) -> None:
        """Numbers as plain Python ``int``/``float`` (numpy scalars too), refusing booleans,
        non-numbers, infinities, NaN and integers wider than 64 bits: a value that slips
        through would only fail later, inside an engine step shared with other requests."""
        for name in _REAL_FIELDS:
            setattr(self, name, finite_float(name, getattr(self, name)))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None or name in ("n", "top_k"):
                setattr(self, name, int64(name, value))
        if not all(isinstance(s, str) for s in self.stop_strings):
            raise ValueError("stop must be a string or a list of strings")

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (
                self.top_k >= -1,
                f"top_k must be -1 (disable), 0 (disable) or positive, got {self.top_k}",
            ),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.seed is None or self.seed >= 0,
                f"seed must be >= 0, got {self.seed}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.logprobs is None or self.logprobs >= 0,
                f"logprobs must be >= 0, got {self.logprobs}",
            ),
            (all(s for s in self.stop_strings), "stop strings must not be empty"),
            (isinstance(self.prefix_caching, bool), "prefix_caching must be a boolean"),
            (
                self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt),
                "cache_salt must be a non-empty string",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


_REAL_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "logprobs")


@dataclass(frozen=True)
class Logprob:
    """Log-probability of one token, its rank in the distribution and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class SampleRow:
    """What the sampler needs of one request: its params, generator and token history."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int]
    grammar: GrammarMatcher | None = None
    """The request's structured-output matcher: only the tokens it allows can be drawn."""


@dataclass
class SampleResult:
    """Sampled tokens [R] and, for rows that asked, their top log-probs.

    ``errors`` (from ``sample_isolated`` only) holds, per row, the exception that row raised
    when sampled alone, or None; a failed row's token is -1.
    """

    tokens: list[int]
    logprobs: list[dict[int, Logprob] | None]
    errors: list[Exception | None] = field(default_factory=list)


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
    """Pick the next token of each row of ``logits`` [R, V] (float32)."""
    want_logprobs = [r.params.logprobs is not None for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    logits = logits.clone()
    for i, r in enumerate(rows):
        if r.params.penalized:
            _apply_penalties(logits[i], r)
    # Before temperature and top-k/p/min-p, so they only ever see grammatical tokens; after
    # the raw log-probs, which report the model's own distribution (as vLLM's do).
    if any(r.grammar is not None for r in rows):
        mask_logits(logits, [r.grammar for r in rows])

    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
    greedy = temps == 0
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        sampled_rows = torch.nonzero(~greedy).flatten()
        scaled = logits[sampled_rows] / temps[sampled_rows, None]
        probs = _filtered_probs(scaled, [rows[int(i)].params for i in sampled_rows])
        # Inverse-CDF sampling with one uniform per row from the row's own generator, so a
        # seeded request draws the same tokens whatever shares its batch. A cumulative sum and
        # a binary search cost a fraction of a noise value per vocabulary entry (the exponential
        # race took 65 us per row at a 4096-token vocabulary, 13% of a 32-request step).
        uniform = torch.stack(
            [
                torch.rand((), generator=rows[int(i)].generator, dtype=torch.float64)
                for i in sampled_rows
            ]
        )
        cdf = probs.double().cumsum(dim=-1)
        # right=True: a draw never lands on a zero-probability token (its cdf equals the one
        # before it).
        picks = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
        tokens[sampled_rows] = picks.clamp(max=probs.shape[1] - 1)

    out_logprobs: list[dict[int, Logprob] | None] = []
    for i, r in enumerate(rows):
        if raw_logprobs is None or r.params.logprobs is None:
            out_logprobs.append(None)
            continue
        out_logprobs.append(_top_logprobs(raw_logprobs[i], int(tokens[i]), r.params.logprobs))
    return SampleResult(tokens=tokens.tolist(), logprobs=out_logprobs)


def sample_isolated(logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
    """``sample``, where a row that raises fails alone instead of failing every row.

    The batched path runs first; only when it raises is each row sampled on its own, and the
    rows that still raise get their exception in ``errors``. A failure is one request's
    problem (its parameters, its history), so the others of the step must go on.
    """
    # The failed batched attempt may have drawn from some generators already: rewinding them
    # keeps a seeded row's draws what they would have been had no other row failed. Greedy
    # rows never draw, so only sampled rows pay for the copy (about 1 us each).
    states = [None if r.params.greedy else r.generator.get_state() for r in rows]
    try:
        result = sample(logits, rows)
    except Exception:
        pass  # find the failing rows below
    else:
        result.errors = [None] * len(rows)
        return result
    result = SampleResult(tokens=[], logprobs=[], errors=[])
    for i, (row, state) in enumerate(zip(rows, states, strict=True)):
        if state is not None:
            row.generator.set_state(state)
        try:
            one = sample(logits[i : i + 1], [row])
        except Exception as exc:
            result.tokens.append(-1)
            result.logprobs.append(None)
            result.errors.append(exc)
        else:
            result.tokens.append(one.tokens[0])
            result.logprobs.append(one.logprobs[0])
            result.errors.append(None)
    return result


def _apply_penalties(logits: torch.Tensor, row: SampleRow) -> None:
    p = row.params
    vocab = logits.shape[0]
    if p.repetition_penalty != 1.0:
        # As in HF and vLLM: tokens of the prompt and the output are made less likely
        # (positive logits divided, negative ones multiplied).
        seen = torch.tensor(row.prompt_ids + row.output_ids, dtype=torch.int64).unique()
        seen = seen[seen < vocab]
        vals = logits[seen]
        logits[seen] = torch.where(
            vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
        )
    if row.output_ids and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(row.output_ids), minlength=vocab)[:vocab].float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Softmax after top-k, top-p and min-p filtering (each per row)."""
    vocab = logits.shape[1]
    if all(not 0 < p.top_k < vocab and p.top_p >= 1.0 and p.min_p <= 0.0 for p in params):
        # Nothing to filter: skip sorting the vocabulary (most of a sampled step's cost).
        return logits.softmax(dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    # Clamped to the vocabulary, so no top_k (up to 2**63 - 1) can overflow the tensor.
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    drop = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params])
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    min_p = torch.tensor([p.min_p for p in params])
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def _top_logprobs(logprobs: torch.Tensor, token: int, n: int) -> dict[int, Logprob]:
    chosen = float(logprobs[token])
    rank = int((logprobs > chosen).sum()) + 1
    out = {token: Logprob(chosen, rank)}
    if n > 0:
        values, ids = logprobs.topk(min(n, logprobs.shape[0]))
        for r, (v, t) in enumerate(zip(values.tolist(), ids.tolist(), strict=True), start=1):
            out.setdefault(t, Logprob(v, r))
    return out
