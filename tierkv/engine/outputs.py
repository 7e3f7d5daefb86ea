"""What the engine does with a sampled token: append it to its request, decide whether the
request stops (stop tokens, EOS, stop strings, a finished grammar, its length), and build the
``RequestOutput`` of a request group."""

from __future__ import annotations

import time

import torch

from tierkv.engine.request import CompletionOutput, Request, RequestOutput
from tierkv.sampling import Logprob
from tierkv.tokenizer import Tokenizer, find_stop


def append_token(
    req: Request, token: int, logprobs: dict[int, Logprob] | None, tokenizer: Tokenizer
) -> bool:
    """Append ``token`` (with its ``logprobs``) to ``req``'s output and text; returns whether
    the request is now finished (its ``finish_reason`` set), for the caller to free it."""
    if req.first_token_time is None:
        req.first_token_time = time.monotonic()
    req.output_token_ids.append(token)
    if req.grammar is not None:
        req.grammar.accept(token)
    if logprobs is not None:
        req.logprobs.append(
            {
                t: Logprob(lp.logprob, lp.rank, tokenizer.decode([t], False))
                for t, lp in logprobs.items()
            }
        )
    params = req.params
    # A teacher-forced request runs its whole forced output: nothing in it stops it early.
    stops = req.forced_output is None
    if stops and (
        token in params.stop_token_ids
        or (token in tokenizer.eos_token_ids and not params.ignore_eos)
    ):
        req.finish_reason = "stop"
    else:
        delta = req.detokenizer.add(token)
        req.text += delta
        cut = find_stop(req.text, params.stop_strings, len(delta)) if delta and stops else None
        if cut is not None:
            req.text = req.text[:cut]
            req.finish_reason = "stop"
    if req.finish_reason is None and req.grammar is not None and req.grammar.finished:
        # The output is complete by its grammar (the closing brace, or the EOS it
        # allows): stop now, ignore_eos or not, rather than run on to max_tokens.
        req.finish_reason = "stop"
    if req.finish_reason is None and len(req.output_token_ids) >= req.max_tokens:
        req.finish_reason = "length"
    return req.finish_reason is not None


def group_output(
    group_id: str, prompt: str | None, children: list[Request], finished: bool
) -> RequestOutput:
    """The output of a request group (its ``n`` completions) as it stands."""
    return RequestOutput(
        request_id=group_id,
        prompt=prompt,
        prompt_token_ids=children[0].prompt_token_ids,
        outputs=[
            CompletionOutput(
                index=i,
                text=r.text,
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason,
                logprobs=list(r.logprobs) if r.params.logprobs is not None else None,
                error=r.error,
                forced_logprobs=(
                    torch.stack(r.forced_logprobs) if finished and r.forced_logprobs else None
                ),
            )
            for i, r in enumerate(children)
        ],
        finished=finished,
    )
