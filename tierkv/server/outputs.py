"""Engine outputs in the wire format's terms: token usage and log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence

from tierkv.engine.request import CompletionOutput, RequestOutput
from tierkv.sampling import Logprob
from tierkv.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)


def count_usage(outputs: Sequence[RequestOutput]) -> Usage:
    """Token counts of requests' final outputs (each prompt counted once)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _entries(c: CompletionOutput, start: int, end: int) -> list[tuple[Logprob, dict[int, Logprob]]]:
    """(sampled token's logprob, all returned logprobs) of tokens ``start:end``."""
    tokens = c.token_ids[start:end]
    return [(e[t], e) for t, e in zip(tokens, (c.logprobs or [])[start:end], strict=True)]


def completion_logprobs(
    c: CompletionOutput, start: int, end: int, offset: int
) -> tuple[CompletionLogprobs, int]:
    """Legacy logprobs of tokens ``start:end``; ``offset`` is the first one's text offset."""
    out = CompletionLogprobs()
    for chosen, entries in _entries(c, start, end):
        text = chosen.decoded_token or ""
        out.tokens.append(text)
        out.token_logprobs.append(chosen.logprob)
        # Tokens with the same text (such as partial UTF-8 bytes) share a key: the likelier wins.
        ranked = sorted(entries.values(), key=lambda e: e.logprob)
        out.top_logprobs.append({(e.decoded_token or ""): e.logprob for e in ranked})
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def _top(lp: Logprob) -> TopLogprob:
    text = lp.decoded_token or ""
    return TopLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()))


def chat_logprobs(c: CompletionOutput, start: int, end: int, top: int) -> ChatLogprobs:
    """Chat logprobs of tokens ``start:end``, each with its ``top`` most likely tokens."""
    content = []
    for chosen, entries in _entries(c, start, end):
        ranked = sorted((e for e in entries.values() if e.rank <= top), key=lambda e: e.rank)
        content.append(
            ChatTokenLogprob(
                **_top(chosen).model_dump(), top_logprobs=[_top(e) for e in ranked[:top]]
            )
        )
    return ChatLogprobs(content=content)
