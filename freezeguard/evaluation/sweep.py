"""A sweep of the demo over freeze ratios, budget bases and seeds: is learned > random, beyond noise?

One demo run compares the learned mask with a few random masks once; the gap is within the
spread of random masks at this scale. This sweep repeats it (ideally on a GPU) and prints one
line per configuration plus the mean learned/random ratio.

Example (the GPU batch the lead runs):
    python -m freezeguard.evaluation.sweep --device cuda --ratios 0.3 0.5 0.7 \\
        --budget-by tensors params --seeds 0 1 --random-seeds 5 --out sweep.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from statistics import mean


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..demo import DemoConfig, run_demo

    p = argparse.ArgumentParser(prog="python -m freezeguard.evaluation.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--budget-by", nargs="+", default=["tensors", "params"], choices=["tensors", "params"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--learner-steps", type=int, default=None)
    p.add_argument("--attacker-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="the quick demo config (a smoke test of the sweep)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="sweep.json")
    args = p.parse_args(argv)

    base = DemoConfig.quick() if args.quick else DemoConfig()
    if args.learner_steps:
        base = base.replace(learner_steps=args.learner_steps)
    if args.attacker_steps:
        base = base.replace(attacker_steps=args.attacker_steps)
    rows = []
    for ratio, by, seed in itertools.product(args.ratios, args.budget_by, args.seeds):
        cfg = base.replace(freeze_ratio=ratio, budget_by=by, seed=seed, random_seeds=args.random_seeds)
        t = time.perf_counter()
        s = run_demo(cfg, out_dir=None, cache_dir=args.cache_dir, progress=False, device=args.device)
        for attacker, table in s["table"].items():
            row = {"ratio": ratio, "budget_by": by, "seed": seed, "attacker": attacker,
                   "learned": table["learned"]["mitigation"], "random": table["random"]["mitigation"],
                   "random_std": table["random"]["mitigation_std"], "vs_random": table["learned"].get("vs_random"),
                   "innocent_learned": table["learned"]["innocent_impact"],
                   "innocent_random": table["random"]["innocent_impact"], "seconds": time.perf_counter() - t}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": str(args.device), "rows": rows}, f, indent=1)
    ratios = [r["vs_random"] for r in rows if r["vs_random"] is not None]
    if ratios:
        print(f"mean learned/random mitigation over {len(ratios)} rows: {mean(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
