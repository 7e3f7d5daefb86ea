"""BackendChain: which backend of a chain serves each kind of work on one store.

A chain (``CHAINS``) is an ordered list of backends. For each kind of work (uniform decode of a
format, tiered decode and compaction of a pair of tier formats, writes of a format) the chain
asks its backends in order and keeps the first that serves it, once per format and dtype:
formats register as requests arrive, so the answer is looked up at first use, not at start.
Uniform and tiered decode always find one (``reference`` serves everything and ends every
chain); compaction and writes may find none, and then the caller's torch path
(``tierkv.kv.policy.compact``, ``KVFormat.encode``) does the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tierkv.kv.backends.base import KVBackend

if TYPE_CHECKING:
    from tierkv.kv.formats.quant import KVFormat
    from tierkv.kv.store.kv_store import KVStore

logger = logging.getLogger(__name__)


class BackendChain:
    """The backends of the chain ``name`` (``backends``, those that can run here), as they
    serve ``store``: every lookup is cached for the store's life."""

    def __init__(self, name: str, backends: list[KVBackend], store: KVStore) -> None:
        self.name = name
        self.backends = backends
        self.store = store
        self._found: dict[tuple, KVBackend | None] = {}

    def decoder(self, f: int, dtype: torch.dtype) -> KVBackend:
        """The backend that decodes slots stored uniformly in format index ``f``."""
        key = ("decode", f, dtype)
        if key not in self._found:
            store = self.store
            fmt, dim, device = store.formats[f], store.head_dim, store.pool.arena.device
            backend = next(b for b in self.backends if b.serves(fmt, dim, dtype, device))
            self._found[key] = backend
            first = self.backends[0]
            if backend is not first and first.name == self.name:
                # The backend the user named does not serve this format here: say why once.
                why = first.unavailable() or first.refusal(fmt, dim, dtype, device)
                logger.warning(
                    "attention backend %s does not serve %s (%s); using %s",
                    first.name,
                    fmt.name,
                    why,
                    backend.name,
                )
        backend = self._found[key]
        assert backend is not None
        return backend

    def tiered(self, formats: tuple[int, int]) -> KVBackend:
        """The backend that decodes tiered slots whose (high, low) tiers are stored in the
        format indices ``formats``, in the store's compute dtype."""
        key = ("tiered", formats)
        if key not in self._found:
            store = self.store
            args = (self._pair(formats), store.head_dim, store.dtype, store.pool.arena.device)
            self._found[key] = self._first(lambda b: b.tiered_refusal(*args))
        backend = self._found[key]
        assert backend is not None, "reference serves every tiered decode"
        return backend

    def compactor(self, formats: tuple[int, int]) -> KVBackend | None:
        """The backend that compacts tiered slots stored in ``formats``, or None."""
        key = ("compact", formats)
        if key not in self._found:
            store = self.store
            args = (self._pair(formats), store.head_dim, store.pool.arena.device)
            self._found[key] = self._first(lambda b: b.compact_refusal(*args))
        return self._found[key]

    def writer(self, f: int) -> Callable[..., None] | None:
        """The ``write`` of the backend that writes new tokens in format index ``f``, or None
        (the store encodes them itself): what ``KVStore.writer_for`` is set to. Asked at every
        layer's write: the cached answer comes first."""
        key = ("write", f)
        if key not in self._found:
            store = self.store
            args = (store.formats[f], store.head_dim, store.dtype, store.pool.arena.device)
            self._found[key] = self._first(lambda b: b.write_refusal(*args))
        backend = self._found[key]
        return None if backend is None else backend.write

    def _pair(self, formats: tuple[int, int]) -> tuple[KVFormat, KVFormat]:
        return self.store.formats[formats[0]], self.store.formats[formats[1]]

    def _first(self, refusal: Callable[[KVBackend], str | None]) -> KVBackend | None:
        return next((b for b in self.backends if refusal(b) is None), None)
