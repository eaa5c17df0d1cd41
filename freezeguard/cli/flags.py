"""Argument types the commands share (a ratio, a number or 'auto'), and old flag spellings kept as
deprecated aliases: they still work, and say the new spelling once.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("--budget-by", "--by", dest="by", action=Renamed, default="tensors")
    >>> p.parse_args(["--budget-by", "params"]).by
    'params'
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Sequence

from freezeguard.core.values import check_ratio

__all__ = ["Renamed", "RenamedSwitch", "number_or_auto", "ratio"]


def number_or_auto(cast: Callable[[str], float], minimum: float, what: str = "a number") -> Callable[[str], Any]:
    """An argparse ``type``: ``'auto'``, or a number (``int`` or ``float``) of at least ``minimum``.

    Example:
        >>> threads = number_or_auto(int, 1, "a number of threads")
        >>> threads("auto"), threads("2")
        ('auto', 2)
    """
    def parse(text: str) -> Any:
        if text == "auto":
            return text
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} >= {minimum} or 'auto', got {text!r}") from None
        if math.isnan(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} or 'auto', got {text}")
        return value

    return parse


def ratio(text: str) -> float:
    """An argparse ``type``: a share in [0, 1] (``core.values.check_ratio``).

    Example:
        >>> ratio("0.3")
        0.3
    """
    try:
        return check_ratio(text, "the ratio")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _warn(old: str, new: str) -> None:
    print(f"freezeguard: warning: {old} is deprecated; use {new}", file=sys.stderr)


class Renamed(argparse.Action):
    """A value option whose first spelling is current and the others deprecated (a warning each use)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string is not None and option_string != self.option_strings[0]:
            _warn(option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


class RenamedSwitch(argparse.Action):
    """A deprecated switch that stands for ``--<new> <const>`` (e.g. ``--bf16`` for ``--precision bf16``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, const: Any, **kwargs: Any) -> None:
        kwargs.setdefault("help", f"deprecated: {new}" + ("" if const is True else f" {const}"))
        super().__init__(option_strings, dest, nargs=0, const=const, default=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _warn(option_string or self.option_strings[0], self.new + ("" if self.const is True else f" {self.const}"))
        setattr(namespace, self.dest, self.const)
