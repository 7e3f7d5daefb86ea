"""The held-out chat prompt sets shipped with tierkv, and how a model sees them.

``tierkv/eval/data/prompts_{dev,test}.jsonl``: one prompt per line, ``{"id", "category",
"messages"}``, written for this project (not taken from a dataset). Categories: factual,
arithmetic, code, instruction, multi_turn, long_form; about a third of the prompts are longer
than 300 tokens under SmolLM2's chat template (a paragraph or a code listing to work on, or an
earlier turn that quotes one), since short prompts leave a compressed cache nothing to
compress. ``dev`` is for tuning, ``test`` is reported once; the two share no prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tierkv.eval.corpus import Split

Message = dict[str, str]


@dataclass(frozen=True)
class ChatPrompt:
    """One conversation that ends with a user turn, to be answered by the model."""

    id: str
    category: str
    messages: tuple[Message, ...]


def load_prompts(split: Split) -> list[ChatPrompt]:
    """The prompts of one split, in file order."""
    text = resources.files("tierkv.eval").joinpath(f"data/prompts_{split}.jsonl").read_text("utf-8")
    out = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(ChatPrompt(row["id"], row["category"], tuple(row["messages"])))
    return out


def spread(prompts: list[ChatPrompt], n: int | None) -> list[ChatPrompt]:
    """``n`` prompts evenly spread over the file (so every category is sampled); all if None."""
    if n is None or n >= len(prompts):
        return list(prompts)
    return [prompts[i * len(prompts) // n] for i in range(n)]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether a Hugging Face tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def plain_text(messages: tuple[Message, ...] | list[Message], answer_prefix: str = "") -> str:
    """A conversation as plain text, for a model without a chat template (the demo model)."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:" + (" " + answer_prefix if answer_prefix else "")


def render(
    tokenizer: Any, messages: tuple[Message, ...] | list[Message], prefix: str = ""
) -> list[int]:
    """Token ids of a conversation ready for the assistant's reply, ``prefix`` already said.

    The chat template when the tokenizer has one; else ``plain_text`` after the tokenizer's
    BOS. ``prefix`` starts the assistant's turn (a needle question's "The number is").
    """
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        # The template writes the BOS token itself where the model wants one.
        return list(tokenizer(text + prefix, add_special_tokens=False).input_ids)
    return list(tokenizer(plain_text(messages, prefix)).input_ids)
