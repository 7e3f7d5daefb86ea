"""The store: the shared page arena (``pool``), per (request, layer, KV head, tier) page tables
and the residual ring (``kv_store``), and the views of them attention reads (``views``)."""
