"""Field types and checks of the request models in ``protocol``: validation at the edge.

Every number is strict (a JSON boolean is not a count, a string is not a temperature), finite
(``1e309``, ``"inf"`` and ``"nan"`` are refused) and within 64 bits; every string must be
encodable text. A request that passes cannot fail later inside an engine step for its values.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Annotated, Any

from pydantic import BaseModel, Field

from tierkv.validate import INT64_MAX, INT64_MIN

logger = logging.getLogger("tierkv.server.protocol")

# ``strict``: OpenAI refuses ``"max_tokens": 2.0`` and ``"temperature": true``, and so do we.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int64 = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(strict=True)]  # the engine checks it against the vocabulary
StopTokenId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]

# Distinct unknown field names logged per process; past this, new ones are not logged (the
# names are the client's choice, so the set must not grow without bound).
MAX_LOGGED_UNKNOWN = 256
_logged_unknown: set[str] = set()
_logged_lock = threading.Lock()


def log_unknown_fields(model: BaseModel) -> None:
    """Log each unknown field name of ``model`` the first time this process sees it."""
    if not model.model_extra:
        return
    with _logged_lock:
        room = MAX_LOGGED_UNKNOWN - len(_logged_unknown)
        new = sorted(set(model.model_extra) - _logged_unknown)[: max(room, 0)]
        _logged_unknown.update(new)
    if new:
        logger.warning(
            "ignoring unknown field(s) %s in %s (each name is logged once)",
            ", ".join(new),
            type(model).__name__,
        )


def check_text(field: str, value: Any) -> None:
    """Refuse a string (anywhere inside ``value``) that is not encodable Unicode text.

    JSON's ``"\\ud800"`` escape decodes to a lone surrogate, which no tokenizer can encode:
    say so here rather than fail in the tokenizer or the chat template.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{field} is not valid Unicode text: it contains a lone surrogate "
                f"(\\u{ord(value[exc.start]):04x} at character {exc.start})"
            ) from None
    elif isinstance(value, list | tuple):
        for item in value:
            check_text(field, item)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(field, key)
            check_text(field, item)


def check_token_ids(prompt: Any) -> None:
    """Refuse booleans and floats in a prompt of token ids with a message of its own (the
    prompt's union of types would otherwise list one complaint per alternative)."""
    if not isinstance(prompt, list):
        return
    for item in prompt:
        for t in item if isinstance(item, list) else [item]:
            if isinstance(t, bool | float):
                raise ValueError(f"token ids must be integers, got {json.dumps(t)}")
