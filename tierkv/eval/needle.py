"""Needle in a haystack (RULER's single-needle task) for chat models.

A haystack of ordinary prose (``data/haystack.txt``, paragraphs written for this project) is
cut to a wanted length; one or more needles, sentences of the form "The special magic number
for <key> is <7 digits>.", are inserted at chosen depths; the user turn ends by asking for one
key's number and the assistant's turn is started with "The special magic number for <key> is"
(RULER's answer prefix: a 135M model answers far more reliably once the sentence is begun).
A greedy answer scores when it contains the exact 7-digit number.

Only tokens count: the prompt (chat template, instructions, needles and all) is built to
``context_tokens`` tokens, and ``depth`` is the needle's position as a fraction of the
haystack's tokens. Models without a chat template get the same text as plain turns.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from tierkv.eval.prompts import render

ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "kind", "lively", "mellow", "noble", "olive", "proud", "quiet", "rapid", "silver", "tidy",
)  # fmt: skip
NOUNS = (
    "badger", "canyon", "falcon", "garden", "harbor", "island", "jacket", "kettle", "lantern",
    "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel", "violin",
)  # fmt: skip
INSTRUCTION = (
    "Some special magic numbers are hidden in the following text. Read it carefully and "
    "remember them, because I will ask you about one of them afterwards."
)
# Greedy tokens after the answer prefix: 7 digits (one token each in most BPE vocabularies)
# plus room for a space and the full stop.
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class NeedleExample:
    """One needle prompt (token ids) and what a correct answer contains.

    ``depth`` is the needle's measured position: tokens of haystack before the queried needle
    over the haystack's tokens; ``requested_depth`` the one asked for.
    """

    ids: list[int]
    answer: str
    key: str
    depth: float
    requested_depth: float
    context_tokens: int


@cache
def haystack_sentences() -> tuple[str, ...]:
    """The shipped prose, one sentence per item, in order."""
    text = resources.files("tierkv.eval").joinpath("data/haystack.txt").read_text("utf-8")
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip())


def needle_sentence(key: str, number: str) -> str:
    """The sentence that hides ``number`` under ``key``."""
    return f"The special magic number for {key} is {number}."


def answer_prefix(key: str) -> str:
    """The start of the assistant's answer (RULER's answer prefix)."""
    return f"The special magic number for {key} is"


def _messages(haystack: str, key: str) -> list[dict[str, str]]:
    question = f"What is the special magic number for {key} mentioned in the text above?"
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{haystack}\n\n{question}"}]


def _ntokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def make_needle_example(
    rng: random.Random,
    tokenizer: Any,
    context_tokens: int,
    depth: float,
    n_needles: int = 1,
) -> NeedleExample:
    """Build one prompt of about ``context_tokens`` tokens with its queried needle at ``depth``.

    Args:
        rng: source of all randomness (keys, numbers, haystack start, distractor depths).
        tokenizer: the model's Hugging Face tokenizer (its chat template if it has one).
        context_tokens: wanted prompt length in tokens, everything included.
        depth: where the queried needle goes, 0 (start of the haystack) to 1 (end).
        n_needles: needles in the haystack; all but the queried one are distractors with
            other keys and numbers at random depths.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    keys: list[str] = []
    while len(keys) < n_needles:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [needle_sentence(k, n) for k, n in zip(keys, numbers, strict=True)]
    key = keys[0]
    overhead = len(render(tokenizer, _messages("", key), answer_prefix(key)))
    budget = context_tokens - overhead - sum(_ntokens(tokenizer, " " + n) for n in needles)
    pool = haystack_sentences()
    start = rng.randrange(len(pool))
    sentences: list[str] = []
    used = 0
    while True:
        s = pool[(start + len(sentences)) % len(pool)]
        cost = _ntokens(tokenizer, " " + s)
        if used + cost > budget:
            break
        sentences.append(s)
        used += cost
    # Insert at the sentence boundary closest to each depth, deepest first so that the
    # indices of the shallower insertions stay valid.
    cum = [0]
    for s in sentences:
        cum.append(cum[-1] + _ntokens(tokenizer, " " + s))
    depths = [depth] + [rng.random() for _ in needles[1:]]

    def slot(d: float) -> int:
        return min(range(len(cum)), key=lambda i: abs(cum[i] - d * used))

    for i in sorted(range(len(needles)), key=lambda i: -slot(depths[i])):
        sentences.insert(slot(depths[i]), needles[i])
    haystack = " ".join(sentences)
    ids = render(tokenizer, _messages(haystack, key), answer_prefix(key))
    # Sentences tokenized one by one can come to a token fewer than joined: drop filler from
    # the end until the prompt is within its length (a window-filling prompt must leave the
    # answer room).
    while len(ids) > context_tokens and sentences[-1] not in needles:
        sentences.pop()
        haystack = " ".join(sentences)
        ids = render(tokenizer, _messages(haystack, key), answer_prefix(key))
    before = haystack[: haystack.index(needles[0])]
    measured = _ntokens(tokenizer, before) / max(1, _ntokens(tokenizer, haystack))
    return NeedleExample(ids, numbers[0], key, measured, depth, context_tokens)


def needle_found(text: str, answer: str) -> bool:
    """Whether a greedy answer contains the exact number (digit groupings ignored)."""
    return answer in re.sub(r"(?<=\d)[,\s](?=\d)", "", text)


def build_needles(
    tokenizer: Any,
    contexts: tuple[int, ...],
    examples: int,
    max_model_len: int,
    split: str = "dev",
    seed: int = 0,
    n_needles: int = 1,
) -> tuple[dict[int, list[NeedleExample]], list[str]]:
    """``examples`` prompts per context length at evenly spaced depths, and notes on skips.

    A length equal to the model's window (8,192 for SmolLM2) is kept, its prompt shortened by
    the answer's ``ANSWER_TOKENS`` so that prompt and answer fit, as RULER counts the tokens to
    generate inside its lengths; the note says so. Longer lengths are skipped with a note.
    Splits draw different keys, numbers and haystack starts from different seeds.
    """
    out: dict[int, list[NeedleExample]] = {}
    notes = []
    for ctx in contexts:
        if ctx > max_model_len:
            notes.append(
                f"needle@{ctx}: skipped, the model's max_model_len is {max_model_len} tokens"
            )
            continue
        prompt = min(ctx, max_model_len - ANSWER_TOKENS)
        if prompt < ctx:
            notes.append(
                f"needle@{ctx}: prompts of up to {prompt} tokens, so that the {ANSWER_TOKENS}"
                f" answer tokens fit max_model_len {max_model_len}"
            )
        rng = random.Random(zlib.crc32(f"{split}/{seed}/{ctx}".encode()))
        out[ctx] = [
            make_needle_example(rng, tokenizer, prompt, (i + 0.5) / examples, n_needles)
            for i in range(examples)
        ]
    return out, notes
