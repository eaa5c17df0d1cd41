"""Old flag spellings kept as deprecated aliases: they still work, and say the new spelling once.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("--budget-by", "--by", dest="by", action=Renamed, default="tensors")
    >>> p.parse_args(["--budget-by", "params"]).by
    'params'
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

__all__ = ["Renamed", "RenamedSwitch"]


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
