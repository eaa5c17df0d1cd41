"""Turn a pytest-benchmark JSON file into a Markdown table of ratios against its own anchors.

Every ratio compares two benchmarks of one group measured in the same run, so it stays
meaningful on a noisy machine where absolute times do not. Speed-up = anchor time /
candidate time (> 1: the freezeguard op is faster), on the median and on the minimum.

Usage:
    python benchmarks/report.py bench.json [--title "CPU, shared machine"] > table.md

Example:
    >>> rows = [{"name": "t1", "group": "g", "extra_info": {"impl": "a", "role": "anchor", "bytes": 8e9},
    ...          "stats": {"median": 2.0, "min": 2.0}},
    ...         {"name": "t2", "group": "g", "extra_info": {"impl": "b", "role": "candidate", "bytes": 8e9},
    ...          "stats": {"median": 1.0, "min": 0.5}}]
    >>> print(markdown({"benchmarks": rows}).splitlines()[2])
    | g | b | 1000.0 | 500.0 | 8.0 | 2.00x a (min 4.00x) |
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

# (group prefix, candidate impl contains, anchor impl contains, minimum speed-up): the
# targets of issue 2, checked against whatever the JSON holds.
TARGETS = [
    ("masked_adamw cpu", "[cpp]", "fused=True", 0.95),
    ("user_update cpu", "[cpp]", "loop", 1.8),
    ("releaser update cpu", "[cpp]", "loop", 1.8),
    ("masked_adamw cuda", "[triton]", "fused=True", 1.2),
    ("user_update cuda", "[triton]", "loop", 10.0),
    ("releaser update cuda", "[triton]", "loop", 10.0),
]


def _short(impl: str) -> str:
    return {"torch.optim.AdamW(fused=True)": "fused", "torch.optim.AdamW(foreach=True)": "foreach",
            "per-tensor loop (authors')": "loop"}.get(impl, impl)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"


def _groups(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or b.get("name", "?")].append(b)
    return groups


def _ratios(b: dict, anchors: list[dict]) -> str:
    if b["extra_info"].get("role") == "anchor":
        return ""
    parts = []
    for a in anchors:
        med = a["stats"]["median"] / b["stats"]["median"]
        low = a["stats"]["min"] / b["stats"]["min"]
        parts.append(f"{med:.2f}x {_short(a['extra_info']['impl'])} (min {low:.2f}x)")
    return " · ".join(parts)


def markdown(data: dict, title: str | None = None) -> str:
    """The whole report: header, one table row per benchmark, then the targets."""
    lines = []
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    if title or cpu or data.get("datetime"):
        lines.append(f"### {title or 'freezeguard op benchmarks'}")
        lines.append("")
        meta = [x for x in (cpu and f"CPU: {cpu}", data.get("datetime") and f"date: {data['datetime']}") if x]
        gpus = {b["extra_info"].get("gpu") for b in data.get("benchmarks", []) if b["extra_info"].get("gpu")}
        threads = {b["extra_info"].get("threads") for b in data.get("benchmarks", []) if "threads" in b["extra_info"]}
        meta += [f"GPU: {g}" for g in sorted(gpus)] + [f"torch threads: {t}" for t in sorted(threads)]
        lines.append(", ".join(meta))
        lines.append("")
    has_mem = any("peak_mem_bytes" in b["extra_info"] for b in data.get("benchmarks", []))
    lines.append("| group | implementation | median ms | min ms | GB/s (median) | speed-up vs anchors |"
                 + (" peak GiB |" if has_mem else ""))
    lines.append("|---|---|---:|---:|---:|---|" + ("---:|" if has_mem else ""))
    for group, rows in _groups(data).items():
        anchors = [b for b in rows if b["extra_info"].get("role") == "anchor"]
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            info, st = b["extra_info"], b["stats"]
            gbs = info.get("bytes", 0) / st["median"] / 1e9
            mem = ""
            if has_mem:
                mem = f" {info['peak_mem_bytes'] / 2**30:.2f} |" if "peak_mem_bytes" in info else " |"
            lines.append(f"| {group} | {info.get('impl', b.get('name', '?'))} | {_ms(st['median'])} | "
                         f"{_ms(st['min'])} | {gbs:.1f} | {_ratios(b, anchors)} |{mem}")
    checks = _targets(data)
    if checks:
        lines += ["", "| target | measured (median) | met |", "|---|---:|---|"] + checks
    return "\n".join(lines)


def _targets(data: dict) -> list[str]:
    out = []
    for group, rows in _groups(data).items():
        for prefix, cand, anchor, need in TARGETS:
            if not group.startswith(prefix):
                continue
            c = [b for b in rows if cand in b["extra_info"].get("impl", "")]
            a = [b for b in rows if anchor in b["extra_info"].get("impl", "")]
            if c and a:
                r = a[0]["stats"]["median"] / c[0]["stats"]["median"]
                out.append(f"| {group}: {cand.strip('[]')} >= {need}x {_short(a[0]['extra_info']['impl'])} | "
                           f"{r:.2f}x | {'yes' if r >= need else 'NO'} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="output of pytest --benchmark-json")
    parser.add_argument("--title", default=None, help="heading of the table")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    if not data.get("benchmarks"):
        print(f"{args.json_file}: no benchmarks in this file", file=sys.stderr)
        return 1
    print(markdown(data, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
