"""One validator per kind of value the library takes: a share in [0, 1] and a positive number.

Every layer above checks these values with these two functions (a mask's freeze ratio, the
learner's settings, the baselines' step sizes, the command line's --ratio), so a value is
refused the same way, with the same words, wherever it enters.

Example:
    >>> check_ratio(0.25), check_positive(3, "steps", integer=True)
    (0.25, 3)
    >>> check_ratio(1.5)
    Traceback (most recent call last):
        ...
    ValueError: freeze ratio must be in [0, 1], got 1.5
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["check_ratio", "check_positive"]


def check_ratio(value: Any, name: str = "freeze ratio") -> float:
    """``value`` as a float in [0, 1] (NaN refused); ValueError naming ``name`` otherwise."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}") from None
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    return ratio


def check_positive(value: Any, name: str, who: str | None = None, *, integer: bool = False,
                   allow_zero: bool = False) -> Any:
    """``value`` when it is a finite number > 0 (>= 0 with ``allow_zero``; an int with ``integer``).

    TypeError for a value that is not a number (bools refused), ValueError for one out of range;
    ``who`` (the function taking the value) prefixes the message.
    """
    prefix = f"{who}: " if who else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise TypeError(f"{prefix}{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{prefix}{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return value
