"""The KV cache: formats, the page store, policies and attention backends side by side.

This module is the cache's public face: the engine and the model import from here only.
"""

from tierkv.kv.attention.paged import PagedAttention
from tierkv.kv.backends import BACKENDS
from tierkv.kv.formats.quant import FORMATS, KVFormat, default_page_bytes
from tierkv.kv.policy.spec import SUPPORTED_POLICIES, KVPolicy
from tierkv.kv.store.kv_store import KVStore
from tierkv.kv.store.pool import PagePool
from tierkv.kv.store.prefix import PrefixCache, PrefixHit, Sharing, namespace_key

__all__ = [
    "BACKENDS",
    "FORMATS",
    "SUPPORTED_POLICIES",
    "KVFormat",
    "KVPolicy",
    "KVStore",
    "PagePool",
    "PagedAttention",
    "PrefixCache",
    "PrefixHit",
    "Sharing",
    "default_page_bytes",
    "namespace_key",
]
