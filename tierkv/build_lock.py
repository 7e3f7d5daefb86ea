"""An inter-process lock for the kernel build that a killed builder cannot leave behind.

torch's own build lock (``torch.utils.file_baton.FileBaton``) is a file that exists while a
build runs: a process killed mid-build leaves it, and every later process then polls for its
removal forever. This lock is an OS file lock (``fcntl.flock``) on an open file instead: the
kernel releases it when its holder exits, however it exits, so a stale lock cannot exist. The
holder writes its PID and host into the file so that a waiter can say whom it waits for, and a
waiter gives up after a bounded time (a live builder that hangs) with an error naming the lock.

Where ``fcntl`` does not exist (Windows) the lock is a no-op and torch's own lock serializes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Longest plausible build: about 3 minutes on 2 cores, several times that on a loaded machine.
DEFAULT_TIMEOUT_S = 1200.0
TIMEOUT_ENV = "TIERKV_KERNEL_BUILD_TIMEOUT"


class BuildLockTimeout(TimeoutError):
    """Another process held the build lock for longer than the timeout."""


def default_timeout() -> float:
    """The wait bound: ``$TIERKV_KERNEL_BUILD_TIMEOUT`` seconds, else ``DEFAULT_TIMEOUT_S``."""
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its holder recorded it ("PID 123 on host")."""
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        return "another process"
    return f"PID {pid} on {host}" if pid else "another process"


@contextmanager
def build_lock(path: Path, timeout_s: float | None = None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the exclusive lock at ``path`` for the body, waiting at most ``timeout_s`` for it.

    Logs one line when it has to wait, naming the holder and the lock file. Raises
    ``BuildLockTimeout`` when the holder keeps it longer than ``timeout_s`` seconds.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    timeout_s = default_timeout() if timeout_s is None else timeout_s
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            who = holder(path)
            logger.warning("waiting for the kernel build in %s (lock %s)...", who, path)
            deadline = time.monotonic() + timeout_s
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise BuildLockTimeout(
                        f"gave up after {timeout_s:.0f}s waiting for the kernel build in {who} "
                        f"(lock {path}); if that process hangs, stop it, or raise "
                        f"${TIMEOUT_ENV}"
                    )
                time.sleep(poll_s)
        # The file is never deleted (a waiter may already hold it open); its content only says
        # who holds the lock now.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
