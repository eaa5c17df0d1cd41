"""Is the demo's learned mask better than random freezing, beyond noise? A sweep of the learner.

Varies the freeze ratio and the learner's settings (seed, steps, the simulated user, the budget
and mask learning rates) on the demo's toy world and evaluates every learned mask against the
same full fine-tunes and the same random masks, for three attackers: the demo's standard one,
10x its learning rate, and 3x its steps. Each variant is the demo's config with the changes
listed in ``VARIANTS``; everything is seeded, so a row is reproducible. Random baselines are
computed once per ratio, with more seeds than the demo.

    python benchmarks/demo_sweep.py --ratios 0.5 --random-seeds 6 --json sweep.json
    python benchmarks/demo_sweep.py --markdown sweep.json   # the table in benchmarks/RESULTS.md

On CPU, with the demo's cached pretrained model: about 1 minute per mask (learned or random)
per ratio. ``--quick`` runs the demo's shortened configuration (a smoke test).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from freezeguard.apps.demo import DemoConfig, learn_mask, publisher_finetune
from freezeguard.apps.evaluate.harness import Attacker, attacker_suite, evaluate_masks
from freezeguard.apps.evaluate.toy_domains import toy_domains
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers import judge as judge_mod
from freezeguard.integrations.diffusers import toy

# Changes to the demo's learner settings ("demo": none). seed_offset and steps_mult are relative
# to the base config, so the variants mean the same under --quick.
VARIANTS: dict[str, dict] = {
    "demo": {},
    "learner seed 1": {"seed_offset": 1},
    "learner seed 2": {"seed_offset": 2},
    "3x learner steps": {"steps_mult": 3},
    "simulated user lr x10": {"user_lr": 1e-2},
    "simulated user sgd (authors')": {"user_optimizer": "sgd"},
    "user step every 2nd step": {"user_interval": 2},
    # The authors' c_sparsity (5e3) and mask_lr (10) let the budget term saturate every logit in the
    # first releaser step, in its random initial order (MaskLearner's mask_moved stays 0). These
    # let the data term lead:
    "c 50 mask_lr 1e3": {"c_sparsity": 50.0, "mask_lr": 1e3},
    "c 5 mask_lr 1e4": {"c_sparsity": 5.0, "mask_lr": 1e4},
    "c 50 mask_lr 1e3 user lr x10": {"c_sparsity": 50.0, "mask_lr": 1e3, "user_lr": 1e-2},
    "c 50 mask_lr 1e3 learner seed 1": {"c_sparsity": 50.0, "mask_lr": 1e3, "seed_offset": 1},
    "c 50 mask_lr 1e3 learner seed 2": {"c_sparsity": 50.0, "mask_lr": 1e3, "seed_offset": 2},
}


def _attackers(cfg: DemoConfig) -> list[Attacker]:
    return attacker_suite(cfg.attacker_lr, cfg.attacker_steps)


def _learned_mask(base: DemoConfig, model, ft_state, loss_fn, change: dict) -> FreezeMask:
    change = dict(change)
    offset = change.pop("seed_offset", 0)
    steps_mult = change.pop("steps_mult", 1)
    cfg = base.replace(learner=base.learner.replace(**change), learner_steps=base.learner_steps * steps_mult)
    if offset:  # a different learner (logit init, batches, noise), same data and publisher model
        cfg = cfg.replace(seed=base.seed + offset)
    mask, _ = learn_mask(model, ft_state, cfg, loss_fn, progress=False)
    return mask


def run(ratios: list[float], variants: list[str], random_seeds: int, *, base: DemoConfig | None = None,
        cache_dir: str | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Evaluate ``variants`` (names in ``VARIANTS``) at each ratio; returns a JSON-able dict."""
    base = base or DemoConfig()
    loss_fn = toy.make_loss_fn(base.pretrain.model)
    judge = judge_mod.train_judge(tuple(toy.ALL_CLASSES), steps=base.judge_steps, seed=base.seed,
                                  cache_dir=cache_dir, progress=progress)
    model = toy.pretrained_model(base.pretrain, cache_dir=cache_dir, progress=progress, device=device)
    ft_state = publisher_finetune(model, base, loss_fn, progress=progress)
    domains = toy_domains(base.target, base.innocent, judge=judge, batch_size=base.batch_size,
                          heldout_n=base.heldout_n, sample_n=base.sample_n, sample_steps=base.sample_steps,
                          guidance=base.guidance)
    out = {"config": base.to_json(), "device": str(device), "random_seeds": random_seeds, "ratios": {}}
    for ratio in ratios:
        t0 = time.perf_counter()
        cfg = base.replace(learner=base.learner.replace(freeze_ratio=ratio))
        masks: dict[str, FreezeMask | None] = {"full": None}
        for k in range(random_seeds):
            masks[f"random#{k}"] = FreezeMask.random(model, ratio, by=cfg.learner.budget_by, seed=base.seed + k)
        for name in variants:
            masks[name] = _learned_mask(cfg, model, ft_state, loss_fn, VARIANTS[name])
        result = evaluate_masks(model, masks, domains, loss_fn, _attackers(cfg), seed=base.seed + 31,
                                progress=progress)
        summary = result.summary()
        out["ratios"][str(ratio)] = {"table": summary["table"], "masks": summary["masks"],
                                     "seconds": time.perf_counter() - t0}
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def markdown(res: dict) -> str:
    lines = [f"Random baseline: {res['random_seeds']} seeds per ratio (mean ± std). Mitigation = share of the "
             "full fine-tune's recognisability gain on the target removed; innocent = the same on the innocent "
             "domain (lower is better).", "",
             "| ratio | mask | standard: mitigation | vs random | innocent | 10x lr: mitigation | vs random | "
             "3x steps: mitigation | vs random |", "|---|---|---|---|---|---|---|---|---|"]
    for ratio, r in res["ratios"].items():
        table = r["table"]
        attackers = list(table)
        groups = [g for g in table[attackers[0]] if g != "full"]
        for g in groups:
            cells = [ratio, g]
            for i, a in enumerate(attackers):
                row, rnd = table[a][g], table[a]["random"]
                mit = row["mitigation"]
                if g == "random":
                    cells.append(f"{_pct(mit)} ± {100 * (row['mitigation_std'] or 0):.1f}")
                    cells.append("")
                else:
                    cells.append(_pct(mit))
                    # a ratio to a random baseline that mitigates nothing (or less) would say nothing
                    ratio_vs = mit / rnd["mitigation"] if mit is not None and (rnd["mitigation"] or 0) > 0 else None
                    cells.append("n/a" if ratio_vs is None else f"{ratio_vs:.2f}x")
                if i == 0:
                    cells.append(", ".join(_pct(v) for v in row["innocent_impact"].values()))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/demo_sweep.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.5", help="comma-separated freeze ratios (by tensors)")
    parser.add_argument("--variants", default=";".join(VARIANTS), help=f"';'-separated, of: {'; '.join(VARIANTS)}")
    parser.add_argument("--random-seeds", type=int, default=6, help="random masks per ratio")
    parser.add_argument("--budget-by", choices=("tensors", "params"), default="tensors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None, help="the demo's cache (default: $FREEZEGUARD_CACHE or ~/.cache)")
    parser.add_argument("--quick", action="store_true", help="the demo's shortened config (a smoke test)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", default=None, metavar="JSON", help="print the table of a results file and exit")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo's default, 1)")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.random_seeds < 1:
        parser.error("--random-seeds must be >= 1 (learned masks are compared with random ones)")
    base = DemoConfig.quick() if args.quick else DemoConfig()
    base = base.replace(learner=base.learner.replace(budget_by=args.budget_by))
    res = run([float(r) for r in args.ratios.split(",") if r], variants, args.random_seeds, base=base,
              cache_dir=args.cache_dir, device=args.device, progress=sys.stderr.isatty())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
