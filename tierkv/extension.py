"""The package's C++ extension: every kernel under a ``csrc`` folder, one build, made on first use.

The sources are the KV kernels (``tierkv/kv/csrc``: paged decode attention with the score
update, the quantizing and uncompressed writes, compaction, see ``tierkv.kv.native``; bf16
flash attention for prefill, see ``tierkv.kv.partial``) and the model's (``tierkv/model/csrc``:
the small-batch linear layer and the one-pass RMSNorm, SiLU product and rotary embedding, see
``tierkv.model.layers``), with the headers they share. They are compiled together with
``torch.utils.cpp_extension.load`` the first time one is needed (``-O3 -march=native``, or
without ``-march=native`` when the compiler refuses it) into ``$XDG_CACHE_HOME/tierkv/ext/<hash>``
(``~/.cache`` by default), the hash covering the sources, the flags, torch's version and the
CPU, so later processes load the cached build. A machine without a compiler simply has no
native kernels: ``available()`` says so and the engine keeps its torch paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

# The decode kernel (a pybind11 module) and the ops registered under torch.ops.tierkv, and the
# headers they share (part of the build's hash, so editing one rebuilds).
_SOURCES = tuple(sorted(Path(__file__).parent.glob("*/csrc/*.cpp")))
_HEADERS = tuple(sorted(Path(__file__).parent.glob("*/csrc/*.h")))

# Tried in order: the first set the compiler accepts is kept. -fopenmp lets at::parallel_for
# (inlined from torch's headers) spread work items over torch's OpenMP threads.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tierkv" / "ext"


def _cpu_signature() -> str:
    """What a -march=native build depends on: the machine and, on Linux, its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


@functools.cache
def load() -> tuple[ModuleType | None, str | None]:
    """Build (or load the cached build of) the extension once per process.

    Returns the module, or None and why it could not be built.
    """
    try:
        from torch.utils import cpp_extension

        source = b"\0".join(path.read_bytes() for path in _SOURCES + _HEADERS)
    except (ImportError, OSError) as exc:
        return None, f"cannot read the kernel source: {exc}"
    reasons = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), torch.__version__.encode()])
            + _cpu_signature().encode()
        ).hexdigest()[:16]
        build = _cache_root() / key
        try:
            build.mkdir(parents=True, exist_ok=True)
            if not any(build.glob("*.so")):
                # A silent minute at the first engine would look like a hang.
                logger.warning("compiling tierkv's C++ kernels into %s (once per machine)", build)
            module = cpp_extension.load(
                name=f"tierkv_native_{key}",
                sources=[str(path) for path in _SOURCES],
                extra_cflags=list(flags),
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
            return module, None
        except Exception as exc:  # any build failure means "no native kernel", never a crash
            reasons.append(f"{' '.join(flags)}: {str(exc).strip().splitlines()[-1:]}")
    reason = "the native kernel did not build (" + "; ".join(reasons) + ")"
    logger.warning("%s; the engine runs on its slower torch paths", reason)
    return None, reason


def available() -> bool:
    """Whether the native kernels are built and loadable here (builds them on the first call)."""
    return load()[0] is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False, or None when the kernels are available."""
    return load()[1]
