"""The `cpp` backend (being written)."""
from __future__ import annotations


def availability() -> tuple[bool, str]:
    return False, "not built yet"


def supports(device) -> tuple[bool, str]:
    return False, "not built yet"
