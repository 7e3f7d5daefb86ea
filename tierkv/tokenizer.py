"""Tokenizer wrapper: HF tokenizer, chat template, incremental detokenizer, stop strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

Message = dict[str, Any]


class Tokenizer:
    """A model's tokenizer plus the ids that end a generation."""

    def __init__(self, model_dir: str | Path) -> None:
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_ids = _eos_ids(Path(model_dir), self.hf)
        # A fast tokenizer that post-processes nothing decodes exactly as its Rust backend
        # does: calling it directly skips transformers' per-call argument handling, which
        # costs more than the decode itself for the two decodes of every generated token.
        backend = getattr(self.hf, "backend_tokenizer", None)
        self._backend = None if self.hf.clean_up_tokenization_spaces else backend

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with the BOS token if the tokenizer adds one."""
        # Not verbose: transformers warns about texts longer than the model; the engine
        # rejects over-long prompts itself, with their length and the limit.
        return self.hf.encode(_encodable(text), verbose=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``, as the Hugging Face tokenizer's ``decode`` gives it."""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        if not self.hf.chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; use generate() with text"
            )
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # The template writes the BOS token itself where the model wants one.
        return self.hf.encode(_encodable(text), add_special_tokens=False)


def _encodable(text: str) -> str:
    """``text``, or a ``ValueError`` saying why no tokenizer can encode it (the Rust backend
    answers a lone surrogate, such as JSON's ``"\\ud800"``, with a bare ``TypeError``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text is not valid Unicode: it contains a lone surrogate "
            f"(\\u{ord(text[exc.start]):04x} at character {exc.start})"
        ) from None
    return text


def _eos_ids(model_dir: Path, hf: PreTrainedTokenizerBase) -> set[int]:
    ids = set()
    if hf.eos_token_id is not None:
        ids.add(hf.eos_token_id)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, never splitting a UTF-8 character.

    Decoding only a short window of trailing ids keeps each step O(1); text ending in the
    replacement character means a multi-byte character is incomplete, so it is held back.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        # Seed the window with the prompt's tail so the first token decodes with its context
        # (leading-space handling of sentencepiece-like tokenizers).
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: list[str], new_chars: int) -> int | None:
    """Index where the earliest stop string starts, looking only where new text could end one."""
    start = max(0, len(text) - new_chars - max((len(s) for s in stops), default=0))
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
