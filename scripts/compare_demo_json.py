"""Compare two `freezeguard demo --json` outputs field by field, ignoring what may differ between runs.

A refactor must leave the demo's figures unchanged; timings, peak memory and the report folder
are allowed to differ. Exit 0 when every other field is equal (NaN equals NaN), 1 otherwise,
listing the first differences.

    freezeguard demo --quick --json --quiet --out /tmp/a > before.json   # on the old commit
    freezeguard demo --quick --json --quiet --out /tmp/b > after.json    # on the new one
    python scripts/compare_demo_json.py before.json after.json
"""
from __future__ import annotations

import json
import math
import sys

IGNORED = {"timings_s", "report_dir", "seconds", "peak_bytes"}


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key in IGNORED:
                continue
            if key not in a or key not in b:
                out.append(f"{path}/{key}: only in {'the second' if key not in a else 'the first'}")
            else:
                out += differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return [] if a == b or both_nan else [f"{path}: {repr(a)[:100]} vs {repr(b)[:100]}"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    with open(argv[0]) as fa, open(argv[1]) as fb:
        found = differences(json.load(fa), json.load(fb))
    print(f"{len(found)} difference(s) (ignoring {', '.join(sorted(IGNORED))})")
    for line in found[:40]:
        print(" ", line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
