"""The demo-model corpus: the running interpreter's standard library sources.

The split is fixed by module name so that the training recipe, the model card and the
fidelity harness all agree on which text the model has never seen. ``dev`` is for tuning
(e.g. choosing compression settings), ``test`` is reported once.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Literal

Split = Literal["dev", "test"]

# Directory names whose contents are excluded everywhere: test suites (huge, repetitive),
# IDLE and lib2to3 (GUI code and deprecated fixtures), third-party packages and caches.
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})

# Held-out modules, paths relative to the stdlib root; a trailing "/" means a package.
# Medium-sized, ordinary library code spanning parsing, text, numerics and data formats.
HELD_OUT: dict[Split, tuple[str, ...]] = {
    "dev": (
        "calendar.py",
        "configparser.py",
        "heapq.py",
        "ipaddress.py",
        "shlex.py",
        "statistics.py",
    ),
    "test": (
        "argparse.py",
        "csv.py",
        "difflib.py",
        "fractions.py",
        "json/",
        "textwrap.py",
    ),
}


def stdlib_root() -> Path:
    """Return the standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def stdlib_files(root: Path | None = None) -> list[Path]:
    """List the usable ``.py`` files under ``root`` (default: the stdlib), sorted.

    Files inside :data:`EXCLUDED_DIRS` and files that are not valid UTF-8 are skipped.
    """
    root = stdlib_root() if root is None else root
    files = []
    for path in sorted(root.rglob("*.py")):
        rel_parts = path.relative_to(root).parts
        if EXCLUDED_DIRS.intersection(rel_parts[:-1]) or not path.is_file():
            continue
        if _is_utf8(path):
            files.append(path)
    return files


def _held_out_match(rel: str, names: tuple[str, ...]) -> bool:
    return any(rel == name or (name.endswith("/") and rel.startswith(name)) for name in names)


def held_out_files(split: Split, root: Path | None = None) -> list[Path]:
    """Return the files of the ``dev`` or ``test`` held-out split, sorted."""
    root = stdlib_root() if root is None else root
    names = HELD_OUT[split]
    return [p for p in stdlib_files(root) if _held_out_match(p.relative_to(root).as_posix(), names)]


def train_files(root: Path | None = None) -> list[Path]:
    """Return every usable stdlib file that is in neither held-out split, sorted."""
    root = stdlib_root() if root is None else root
    names = HELD_OUT["dev"] + HELD_OUT["test"]
    return [
        p for p in stdlib_files(root) if not _held_out_match(p.relative_to(root).as_posix(), names)
    ]


def read_text(files: list[Path]) -> list[str]:
    """Read ``files`` as UTF-8 text, in order."""
    return [p.read_text(encoding="utf-8") for p in files]
