"""The KV cache: formats, the page pool, per-head page tables, policies and attention."""
