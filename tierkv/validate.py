"""Checks of the numbers a request carries, shared by ``SamplingParams`` and the server.

A value that is not what it claims (a boolean for a count, an infinity for a temperature, an
integer wider than 64 bits) must be refused where it enters: past that point it only fails
later, inside an engine step that other requests share.
"""

from __future__ import annotations

import math
import numbers
import operator

# Everything downstream (torch tensors, generator seeds) holds integers in 64 bits.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def finite_float(name: str, value: object) -> float:
    """``value`` as a finite ``float`` (ints and numpy scalars too), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def int64(name: str, value: object) -> int:
    """``value`` as an ``int`` that fits in 64 bits (numpy integers too, never a float or a
    boolean), else ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{name} must fit in 64 bits, got {number}")
    return number
