"""The package's C++ extension: every kernel under a ``csrc`` folder, one build, made on first use.

The sources are the KV kernels of the ``cpu`` backend (``tierkv/kv/backends/cpu/csrc``: paged
decode attention with the score update, the quantizing and uncompressed writes, compaction, see
``tierkv.kv.backends.cpu.ops``; bf16 flash attention for prefill, see
``tierkv.kv.backends.partial``) and the model's (``tierkv/model/csrc``:
the small-batch linear layer and the one-pass RMSNorm, SiLU product and rotary embedding, see
``tierkv.model.layers``), with the SIMD helpers they share and the op registration
(``tierkv/csrc``). They are compiled together with ``torch.utils.cpp_extension.load`` the
first time one is needed (``-O3 -march=native``, or without ``-march=native`` when the compiler
refuses it). A machine without a compiler simply has no native kernels: ``available()`` says so
and the engine keeps its torch paths.

Every kernel is a torch op, called as ``torch.ops.tierkv.<name>``: the schemas of all of them
are declared once, in ``tierkv/csrc/registration.cpp`` (``TORCH_LIBRARY(tierkv, m)``), and each
kernel file registers only its implementation for its dispatch key (``TORCH_LIBRARY_IMPL``),
so kernels for another device can register under the same names. The build is still a Python
extension module (torch's loader and ``load()`` import it), but one without functions:
importing it loads the library, which registers the ops, so call ``load()`` (or
``available()``) before the first ``torch.ops.tierkv`` call.

The build lives in ``$XDG_CACHE_HOME/tierkv/ext/<key>`` (``~/.cache`` by default). The key
covers the sources, the flags and what the binary depends on (``environment()``): torch's
exact build (version, commit, C++11 ABI), the Python ABI, the compiler and the CPU. Several
virtual environments with different torch installs therefore each get their own build instead
of rebuilding one another's. Install paths are left out on purpose: a finished build is
recorded by a stamp file and later loaded directly, without re-running torch's ninja build
(whose command lines name the paths and would rebuild on any change), so two environments with
the same torch wheel at different paths share one build. One process builds at a time under an
OS file lock (``tierkv.build_lock``), which a killed builder cannot leave behind.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch

from tierkv.build_lock import BuildLockTimeout, build_lock

logger = logging.getLogger(__name__)

# The kernels and their registration under torch.ops.tierkv (tierkv/csrc/registration.cpp), and
# the headers they share (part of the build's hash, so editing one rebuilds).
_SOURCES = tuple(sorted(Path(__file__).parent.rglob("csrc/*.cpp")))
_HEADERS = tuple(sorted(Path(__file__).parent.rglob("csrc/*.h")))
# Headers every kernel may include by name (SIMD helpers shared by the KV and model kernels).
_SHARED_HEADERS = Path(__file__).parent / "csrc"

# Tried in order: the first set the compiler accepts is kept. -fopenmp lets at::parallel_for
# (inlined from torch's headers) spread work items over torch's OpenMP threads.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
)

STAMP = "tierkv-build.json"
LOCK = "tierkv-build.lock"
# The lock file of torch's own FileBaton: only a killed build leaves it (see _build).
TORCH_LOCK = "lock"
# About 4 CPU-minutes for the whole build (gcc 12, -O3), spread over at most one core per
# source file.
_BUILD_CPU_MINUTES = 4.0


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
def _compiler_signature() -> str:
    """The compiler torch builds with (``$CXX`` or ``c++``) and the first line of its version."""
    from torch.utils.cpp_extension import get_cxx_compiler

    compiler = get_cxx_compiler()
    try:
        out = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{compiler} (not runnable)"
    return f"{compiler} {out.strip().splitlines()[0] if out.strip() else ''}".strip()


def environment() -> dict[str, str]:
    """What a built binary depends on besides its sources and flags (part of the cache key)."""
    return {
        "torch": torch.__version__,
        "torch_git": str(getattr(torch.version, "git_version", "")),
        "cxx11_abi": str(torch.compiled_with_cxx11_abi()),
        "python": str(sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag),
        "compiler": _compiler_signature(),
        "cpu": _cpu_signature(),
    }


def build_key(source: bytes, flags: tuple[str, ...], env: dict[str, str]) -> str:
    """The cache directory name of a build of ``source`` with ``flags`` in environment ``env``."""
    described = json.dumps({"flags": flags, **env}, sort_keys=True).encode()
    return hashlib.sha256(source + b"\0" + described).hexdigest()[:16]


def _import(name: str, build: Path) -> ModuleType:
    """Load the finished build's module straight from its shared library."""
    spec = importlib.util.spec_from_file_location(name, build / f"{name}.so")
    if spec is None or spec.loader is None:
        raise ImportError(f"no loadable {name}.so in {build}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_stamped(name: str, build: Path) -> ModuleType | None:
    """The build's module when a finished build is stamped there, else None."""
    if not (build / STAMP).is_file():
        return None
    try:
        return _import(name, build)
    except ImportError as exc:
        # A stamped build that no longer loads (a deleted .so, a changed system library):
        # forget it and build again.
        logger.warning("rebuilding tierkv's C++ kernels in %s: %s", build, exc)
        (build / STAMP).unlink(missing_ok=True)
        return None


def _build(name: str, build: Path, flags: tuple[str, ...], env: dict[str, str]) -> ModuleType:
    """Compile into ``build`` (the caller holds the build lock) and stamp the result."""
    from torch.utils import cpp_extension

    stale = build / TORCH_LOCK
    if stale.exists():
        # Every tierkv builder holds our lock first, so torch's lock file here is one a killed
        # build left behind; torch would wait for its removal forever.
        logger.warning("removing the lock %s left by a killed kernel build", stale)
        stale.unlink(missing_ok=True)
    cores = os.cpu_count() or 1
    minutes = max(1, round(_BUILD_CPU_MINUTES / min(cores, len(_SOURCES))))
    # A silent minute at the first engine would look like a hang.
    logger.warning(
        "compiling tierkv's C++ kernels into %s: roughly %d min on %d cores, once per "
        "torch/Python/compiler environment",
        build,
        minutes,
        cores,
    )
    module = cpp_extension.load(
        name=name,
        sources=[str(path) for path in _SOURCES],
        extra_cflags=list(flags),
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_SHARED_HEADERS)],
        build_directory=str(build),
        verbose=False,
    )
    stamp = build / f"{STAMP}.tmp"
    stamp.write_text(json.dumps({"flags": flags, **env}, indent=1) + "\n")
    stamp.replace(build / STAMP)  # atomic: a reader sees no stamp or a whole one
    return module


@functools.cache
def load() -> tuple[ModuleType | None, str | None]:
    """Build (or load the cached build of) the extension once per process.

    Returns the module, or None and why it could not be built. The module itself has no
    functions: loading it registers the ops, called as ``torch.ops.tierkv.<name>``.
    """
    try:
        source = b"\0".join(path.read_bytes() for path in _SOURCES + _HEADERS)
        env = environment()
    except (ImportError, OSError) as exc:
        return None, f"cannot read the kernel source: {exc}"
    reasons = []
    for flags in _FLAG_SETS:
        key = build_key(source, flags, env)
        name = f"tierkv_native_{key}"
        build = _cache_root() / key
        try:
            module = _load_stamped(name, build)
            if module is not None:
                return module, None
            with build_lock(build / LOCK):
                # Another process may have finished this build while this one waited.
                module = _load_stamped(name, build) or _build(name, build, flags, env)
            return module, None
        except BuildLockTimeout as exc:
            reasons.append(str(exc))
            break  # the other flag set would wait just as long
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
