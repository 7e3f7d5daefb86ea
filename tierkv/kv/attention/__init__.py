"""Attention over the store for one engine step: ``paged.PagedAttention`` routes each request
to a backend, ``tiered`` attends and scores the requests of differentiated policies."""
