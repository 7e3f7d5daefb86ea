"""KVStore: per (request slot, layer, KV head, tier) page tables over the shared PagePool.

The store is one object over one set of tables, and its jobs live in focused modules, each a
class the store is made of:

* ``tables.PageTables``: the tables, token counts and formats of every slot, taking and freeing
  slots, and growing and freeing pages in batches (the state every other part works on);
* ``tier_io.TokenIO``: byte I/O, reading tiers (``gather``, ``read_tier``) and moving single
  tokens (``take``, ``put``, ``put_tokens``), with the one encode path of new tokens;
* ``ring.ResidualRing``: each uniform slot's residual ring of its newest tokens, uncompressed
  (``read_residual``);
* ``write.TokenWriter``: appending a step's new tokens (``write``) from one plan per step;
* ``accounting.StoreAccounting``: pages and bytes that formats and requests cost and that
  slots hold (``pages_to_admit``, ``bytes_per_token``, ``tier_usage`` ...).

They are mixins, not parts the store holds, because they share every table and because callers
throughout the engine, the attention backends and the policies use them as ``store.method``.
"""

from __future__ import annotations

from tierkv.kv.store.accounting import StoreAccounting
from tierkv.kv.store.ring import ResidualRing
from tierkv.kv.store.tables import HIGH, LOW, RESIDUAL, PageTables
from tierkv.kv.store.tier_io import TokenIO
from tierkv.kv.store.write import TokenWriter

# The tier constants are imported from here by the backends, attention and policies.
__all__ = ["HIGH", "LOW", "RESIDUAL", "KVStore"]


class KVStore(TokenWriter, TokenIO, ResidualRing, StoreAccounting, PageTables):
    """Page tables for up to ``max_seqs`` requests of ``max_model_len`` tokens, any format.

    Built as ``PageTables`` is: ``KVStore(pool, num_layers, num_kv_heads, head_dim, dtype,
    max_seqs, max_model_len)``.
    """
