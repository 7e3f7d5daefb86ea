"""Request: one sequence being generated, and the outputs handed back to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tierkv.kv import KVPolicy
from tierkv.sampling import Logprob, SamplingParams
from tierkv.structured.matcher import GrammarMatcher
from tierkv.tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence: its tokens, how far the KV cache has caught up, and its sampling state.

    ``num_computed_tokens`` catches up with ``num_tokens`` (prompt + output): a prefill is a run
    of steps that each compute a chunk, a decode step computes one token. Preemption resets it
    to zero; the generated tokens stay and are recomputed as part of the next prefill.
    ``group_id`` is the id the caller gave: the ``n`` completions of one prompt are ``n``
    requests of one group. ``kv_policy`` is the request's own KV policy (the engine's unless
    its params chose one). ``forced_output`` (teacher forcing, for evaluation) holds the tokens
    appended in place of the sampled ones; the log-softmax of every sampling row is then kept
    in ``forced_logprobs``. ``error`` says why the request failed on its own (its finish
    reason is then ``"error"``).
    """

    request_id: str
    group_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    max_tokens: int
    kv_policy: KVPolicy
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    finish_reason: str | None = None
    text: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    forced_output: list[int] | None = None
    forced_logprobs: list[torch.Tensor] = field(default_factory=list)
    error: str | None = None
    grammar: GrammarMatcher | None = None
    """Structured output: where the request is in its grammar (advanced with each token)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without copying the whole sequence (the
        runner asks for one token per decode step)."""
        split = len(self.prompt_token_ids)
        if start >= split:
            return self.output_token_ids[start - split : end - split]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - split)]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class CompletionOutput:
    """One completion of a prompt (vLLM's name): text so far, its tokens and why it ended."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, Logprob]] | None = None
    forced_logprobs: torch.Tensor | None = None
    """``[len(forced_output), vocab]`` float32 log-probabilities the model gave each position
    of a teacher-forced request (``Engine.add_request(forced_output=...)``), row ``i`` being
    the distribution that forced token ``i`` replaced a sample from; set once it finishes."""
    error: str | None = None
    """Why this completion failed on its own (``finish_reason`` is then ``"error"``)."""


@dataclass
class RequestOutput:
    """A prompt's result: its completions (``n`` of them); the first one's fields are exposed
    directly (``text``, ``token_ids``...) for the common ``n == 1`` case."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        return self.outputs[0].logprobs

    @property
    def error(self) -> str | None:
        """The first failed completion's error: one failure ends the whole group."""
        return next((c.error for c in self.outputs if c.error is not None), None)
