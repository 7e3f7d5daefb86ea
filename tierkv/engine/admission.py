"""What a request must satisfy before the engine queues it: a prompt that fits the model, a
forced output that fits after it, token ids inside the vocabulary, and a KV policy that suits
the model and fits the pool. Each failure is a ``ValueError`` saying what and by how much, so
the server can answer it with a 4xx and nothing is queued."""

from __future__ import annotations

from tierkv.kv import KVPolicy, KVStore
from tierkv.sampling import SamplingParams


def check_vocab(ids: list[int], what: str, vocab_size: int) -> None:
    """Every id of ``ids`` (``what``: how the error names them) is in ``[0, vocab_size)``."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def check_prompt(ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """A prompt is non-empty and leaves room for at least one generated token."""
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, but max_model_len is {max_model_len} "
            "(prompt plus at least one generated token must fit)"
        )
    check_vocab(ids, "token", vocab_size)


def check_forced(forced: list[int], room: int, max_model_len: int, vocab_size: int) -> None:
    """A teacher-forced output is non-empty and fits the ``room`` left after the prompt."""
    if not forced:
        raise ValueError("forced_output is empty")
    if len(forced) > room:
        raise ValueError(
            f"forced_output has {len(forced)} tokens, but only {room} fit after the prompt "
            f"(max_model_len {max_model_len})"
        )
    check_vocab(forced, "forced token", vocab_size)


def request_policy(
    params: SamplingParams, num_tokens: int, default: KVPolicy, store: KVStore
) -> KVPolicy:
    """The request's KV policy: its own if it names one, else ``default``.

    A policy of its own must suit the model (``register_policy`` refuses one that does not)
    and, for ``num_tokens`` tokens, fit the pool: a request the whole pool cannot hold would
    wait forever.
    """
    if params.kv_policy is None:
        return default
    policy = KVPolicy.parse(params.kv_policy)
    store.register_policy(policy)
    needed = store.pages_to_admit(num_tokens, policy)
    if needed > store.pool.num_pages:
        raise ValueError(
            f"under kv_policy {policy.name!r} a request of {num_tokens} tokens needs "
            f"{needed} KV pages, but the pool has {store.pool.num_pages}"
        )
    return policy
