"""The kernel build cache: one build per environment, and a killed build never blocks the next.

No test here compiles the kernels to completion: builds are either killed within seconds or
replaced by a stand-in for ``torch.utils.cpp_extension.load``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.utils import cpp_extension

from tierkv import build_lock, extension

# Holds the lock until killed.
HOLDER = """
import sys, time
from pathlib import Path
from tierkv.build_lock import build_lock
with build_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _session_members(sid: int) -> list[int]:
    """The live (not zombie) processes of session ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            # Fields after the parenthesized command: state, ppid, pgrp, session, ...
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # not a process, or gone meanwhile
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: ninja puts each compiler in a process group
    of its own, so killing the builder's group alone would leave them running."""
    for _ in range(100):
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"session {sid} survived SIGKILL: {_session_members(sid)}")


def test_a_killed_holders_lock_does_not_block_the_next_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = tmp_path / "tierkv-build.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert build_lock.holder(lock).startswith(f"PID {holder.pid} on ")
        # While it lives, a waiter says whom it waits for and gives up in bounded time.
        with (
            caplog.at_level(logging.WARNING),
            pytest.raises(build_lock.BuildLockTimeout, match=str(lock)),
            build_lock.build_lock(lock, timeout_s=0.5),
        ):
            pass
        assert f"waiting for the kernel build in PID {holder.pid}" in caplog.text
        assert str(lock) in caplog.text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists()  # the file stays; the kernel dropped the dead process's lock
    start = time.monotonic()
    with build_lock.build_lock(lock, timeout_s=5):
        assert build_lock.holder(lock) == f"PID {os.getpid()} on {os.uname().nodename}"
    assert time.monotonic() - start < 1.0


def test_build_keys_differ_per_environment_and_not_per_install_path() -> None:
    env = extension.environment()
    source, flags = b"kernel source", ("-O3",)
    key = extension.build_key(source, flags, env)
    assert extension.build_key(source, flags, dict(env)) == key  # stable
    for field, other in [
        ("torch", "2.99.0+cpu"),
        ("torch_git", "0" * 40),
        ("cxx11_abi", "False"),
        ("python", "cpython-399-x86_64-linux-gnu"),
        ("compiler", "c++ clang version 99"),
    ]:
        assert extension.build_key(source, flags, {**env, field: other}) != key, field
    assert extension.build_key(source, ("-O2",), env) != key
    assert extension.build_key(b"edited", flags, env) != key
    # Two venvs with the same torch wheel at different paths share a build.
    described = json.dumps(env)
    assert sys.prefix not in described and str(Path(cpp_extension.__file__).parent) not in described


def test_a_killed_build_leaves_nothing_that_blocks_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    code = "from tierkv import extension; extension.load()"
    # Its own session, so that killing it also kills the compiler it started.
    builder = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    root = cache / "tierkv" / "ext"
    try:
        # torch's lock file appears once cpp_extension.load has started compiling.
        _wait_for(lambda: any(root.glob(f"*/{extension.TORCH_LOCK}")))
    finally:
        _kill_session(builder.pid)
        builder.wait()
    build = next(root.glob(f"*/{extension.TORCH_LOCK}")).parent
    stale = build / extension.TORCH_LOCK
    assert stale.exists() and not (build / extension.STAMP).exists()

    seen: dict[str, bool] = {}

    def fake_load(**kwargs: object) -> SimpleNamespace:
        seen["torch_lock_left"] = stale.exists()
        return SimpleNamespace(name=kwargs["name"])

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        module, reason = extension.load.__wrapped__()
    assert time.monotonic() - start < 10
    assert reason is None and module.name == f"tierkv_native_{build.name}"
    assert seen == {"torch_lock_left": False}
    assert f"removing the lock {stale} left by a killed kernel build" in caplog.text
    assert "compiling tierkv's C++ kernels" in caplog.text and "min on" in caplog.text
    assert (
        json.loads((build / extension.STAMP).read_text())["torch"]
        == extension.environment()["torch"]
    )


# Loads the extension with torch's builder disabled: only a stamped build can be used.
LOAD_WITHOUT_BUILDING = """
from torch.utils import cpp_extension
def refuse(**kwargs):
    raise RuntimeError("compiled although a finished build was there")
cpp_extension.load = refuse
from tierkv import extension
module, reason = extension.load()
assert reason is None, reason
print(module.__file__)
"""


def test_a_finished_build_is_shared_without_rebuilding(tmp_path: Path) -> None:
    module, reason = extension.load()  # this environment's build, made once per machine
    if module is None:
        pytest.skip(f"no native build here: {reason}")
    built = Path(module.__file__).parent
    # Another cache holding the same finished build, as a second venv with the same torch
    # wheel would find it: it is loaded as is, torch's ninja build never runs.
    shared = tmp_path / "cache" / "tierkv" / "ext" / built.name
    shared.mkdir(parents=True)
    for name in (Path(module.__file__).name, extension.STAMP):
        (shared / name).write_bytes((built / name).read_bytes())
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_BUILDING],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(shared / Path(module.__file__).name)
    assert "compiling" not in run.stderr
