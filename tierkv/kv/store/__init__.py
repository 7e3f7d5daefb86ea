"""The store: the shared page arena (``pool``), and ``KVStore`` (``kv_store``) over it, made of
the per (request, layer, KV head, tier) page tables (``tables``), byte I/O of tiers
(``tier_io``), the residual ring (``ring``), the write of new tokens (``write``) and page and
byte accounting (``accounting``); and the views of them attention reads (``views``)."""
