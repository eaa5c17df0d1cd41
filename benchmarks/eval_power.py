"""Can the demo's evaluation tell masks apart at all? Reliability and selectivity over attack draws.

Issue 11 asks whether the learned mask beats random masks. That question only has an answer if
the evaluation's figures for two masks differ by more than one draw of the attack's randomness
(data order, noise) moves them. This script evaluates, in the demo's toy world, every mask --
``--random-masks`` random ones, the reference rankings and the demo's learner for
``--learner-seeds`` seeds -- under ``--attack-seeds`` draws with ``evaluate_masks``, on held-out
sets larger than the demo's, and prints per metric:

- **reliability** (``metrics.mask_reliability``): the share of the spread between masks that is
  reproducible across draws, for one draw and for the mean of all draws. Near 0, the metric
  cannot rank these masks however large their gaps look;
- per mask group: the removed share on the target and on the innocent domain, their difference
  (**selectivity**: what a mask blocks on the target beyond what it costs the legal user), and
  the paired difference to the random masks' mean draw by draw, with the draws where it was ahead,
  and the multiple of random's target share (**x random**: the paper's learned/random, at the same
  freeze ratio);
- with ``--random-ratios``, random masks at other freeze ratios too, and per group the target share
  it blocks beyond what random masks block **at equal harm** to the innocent domain (random's
  target share interpolated at the group's innocent share, draw by draw). A mask that freezes more
  blocks more of both domains; this asks whether it buys its target share more cheaply than random.

Two probes of the world itself: ``--parts`` adds each part of the UNet frozen whole (does adapting
to either domain need particular tensors at all?), and ``--prior-share`` fills that share of every
fine-tune's batch with the base classes under their own prompts (prior preservation, for attacker
and legal user alike), so the new class must be tied to its prompt.

    OMP_NUM_THREADS=1 python benchmarks/eval_power.py --attack-seeds 5 --json power.json
    OMP_NUM_THREADS=1 python benchmarks/eval_power.py --innocent triangle --attack-seeds 3
    OMP_NUM_THREADS=1 python benchmarks/eval_power.py --freeze-ratio 0.9 --random-ratios 0.5,0.7,0.8 --sample-n 0
    python benchmarks/eval_power.py --markdown power.json        # the tables in benchmarks/RESULTS.md

The attackers, data and metrics are the demo's and never depend on the mask; only the held-out
sizes (``--heldout-n``, ``--sample-n``) are larger, to take the measurement noise out of the
comparison. ``--sample-n 0`` skips sampling and the judge (loss metrics only, ~3x faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from statistics import StatisticsError, correlation, mean, stdev

import torch

from freezeguard.apps.demo import (
    DemoConfig,
    attackers,
    learn_mask,
    publisher_finetune,
    random_masks_at,
    reference_scores,
)
from freezeguard.apps.evaluate.equal_harm import equal_harm_rows, group_draws
from freezeguard.apps.evaluate.harness import evaluate_masks
from freezeguard.apps.evaluate.metrics import mask_group, times_random
from freezeguard.apps.evaluate.toy_domains import toy_domains
from freezeguard.core import files
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers import judge as judge_mod
from freezeguard.integrations.diffusers import toy

REFERENCES = ("delta", "cross-attention", "saliency")
STARTS = ("uniform", "constant") + REFERENCES     # the learner's starts (--init, --variants)


def _high_res(name: str, levels: int) -> bool:
    return name.startswith(("conv_in.", "conv_out.", "conv_norm_out.", "down_blocks.0.", f"up_blocks.{levels - 1}."))


# Parts of a diffusers UNet, each frozen whole by ``--parts`` (diffusers names: attn1 is
# self-attention, attn2 cross-attention; down_blocks.0 and the last up block work at full resolution).
PARTS = {
    "high-res path": _high_res,
    "low-res path": lambda n, levels: not _high_res(n, levels) and not n.startswith("time_embedding."),
    "cross-attention": lambda n, levels: ".attn2." in n,
    "self-attention": lambda n, levels: ".attn1." in n,
    "resnets": lambda n, levels: ".resnets." in n,
    "norms and biases": lambda n, levels: "norm" in n or n.endswith(".bias"),
}


def part_masks(model) -> dict:
    """``part: <name>`` -> the mask freezing exactly that part of the UNet (at its own share of parameters)."""
    names = [n for n, _ in model.named_parameters()]
    levels = len(model.config.block_out_channels)
    return {f"part: {part}": FreezeMask.from_names(model, [n for n in names if rule(n, levels)])
            for part, rule in PARTS.items()}


def attacker_choices(cfg: DemoConfig) -> list:
    """The demo's attackers with the 3x-steps one added (the demo leaves it out for time)."""
    return attackers(cfg.replace(strong_steps_mult=3.0))


def build_masks(cfg: DemoConfig, model, loss_fn, *, random_masks: int, learner_seeds: int,
                random_ratios: tuple[float, ...] = (), parts: bool = False, variants: tuple[str, ...] = (),
                log=print) -> dict:
    """full, random#k, the reference rankings and the demo's learner for each seed (``learned#s``);
    ``random@R#k`` for every other freeze ratio R in ``random_ratios``; with ``parts``, ``part_masks``;
    for each learner variant V in ``variants`` (see ``variant_config``), ``learned V#s`` instead."""
    ft_state = publisher_finetune(model, cfg, loss_fn, progress=False)
    masks: dict = {"full": None}
    for k in range(random_masks):
        masks[f"random#{k}"] = FreezeMask.random(model, cfg.learner.freeze_ratio, by=cfg.learner.budget_by, seed=cfg.seed + k)
    masks.update(random_masks_at(model, random_ratios, random_masks, by=cfg.learner.budget_by, seed=cfg.seed))
    scores = reference_scores(model, ft_state, cfg, loss_fn, REFERENCES)
    for name in REFERENCES:
        masks[f"ref: {name}"] = FreezeMask.from_scores(model, scores[name], cfg.learner.freeze_ratio, by=cfg.learner.budget_by)
    if parts:
        masks.update(part_masks(model))
    learners = {f"learned {v}": variant_config(cfg, v) for v in variants} or {"learned": cfg}
    for label, lcfg in learners.items():
        for s in range(learner_seeds):
            t0 = time.perf_counter()
            mask, logs = learn_mask(model, ft_state, lcfg.replace(seed=cfg.seed + s), loss_fn, progress=False,
                                    scores=scores)
            masks[f"{label}#{s}"] = mask
            log(f"[power] {label} seed {s}: {time.perf_counter() - t0:.0f} s; the data moved "
                f"{logs[-1]['frozen_moved']} tensors out of the initial mask; the learned mask freezes "
                f"{len(mask.frozen_names)}")
    return masks


# "+NAMEvalue" parts of a learner variant: the DemoConfig field each sets, and its type.
VARIANT_KNOBS = {"w": ("innocent_weight", float), "steps": ("learner_steps", int), "lr": ("mask_lr", float)}


def variant_config(cfg: DemoConfig, variant: str) -> DemoConfig:
    """The learner variant "INIT[+density][+wX][+stepsN][+lrX]": the learner's start (uniform,
    constant or a reference name); "+density" sets ``signal_density``, "+wX" ``innocent_weight``,
    "+stepsN" ``learner_steps``, "+lrX" ``mask_lr``. Density is off and the weight 1 unless named;
    every other setting is ``cfg``'s."""
    init, *extras = variant.split("+")
    changes: dict = {"signal_density": False, "innocent_weight": 1.0}   # the learner's; learner_steps the demo's
    for extra in extras:
        knob = next((k for k in sorted(VARIANT_KNOBS, key=len, reverse=True) if extra.startswith(k)), None)
        if extra == "density":
            changes["signal_density"] = True
        elif knob and _positive(extra[len(knob):], VARIANT_KNOBS[knob][1]):
            field, kind = VARIANT_KNOBS[knob]
            changes[field] = kind(extra[len(knob):])
        else:
            init = None
    if init not in STARTS:
        raise ValueError(f"learner variant {variant!r}: INIT[+density][+wX][+stepsN][+lrX], INIT one of "
                         f"{', '.join(STARTS)}, X >= 0 the innocent weight / mask lr, N the learner's steps")
    steps = {"learner_steps": changes.pop("learner_steps")} if "learner_steps" in changes else {}
    return cfg.replace(init=init, learner=cfg.learner.replace(**changes), **steps)


def _positive(text: str, kind: type) -> bool:
    try:
        return kind(text) >= 0
    except ValueError:
        return False


def group_rows(draws: dict[str, dict[str, list[float | None]]], target: str, innocent: str) -> list[dict]:
    """Per mask group: target / innocent removed share, selectivity, the paired difference to random and
    the multiple of random's target share (``times_random``: the paper's learned/random, at the same
    freeze ratio only for groups that freeze as much as "random"; None where random blocks nothing)."""
    def avg(values):  # None (undefined: the full fine-tune gained nothing) is left out
        values = [v for v in values if v is not None]
        return mean(values) if values else None

    t, i = group_draws(draws[target]), group_draws(draws[innocent])
    random_target = avg(t.get("random", []))
    rows = []
    for g in t:
        diff = ([a - b for a, b in zip(t[g], t["random"], strict=True) if a is not None and b is not None]
                if "random" in t else [])
        tm, im = avg(t[g]), avg(i.get(g, []))
        rows.append({"group": g, "masks": sum(mask_group(m) == g for m in draws[target]), "target": tm,
                     "innocent": im, "selectivity": None if tm is None or im is None else tm - im,
                     "vs_random": mean(diff) if diff else None,
                     "times_random": None if g == "random" else times_random(tm, random_target),
                     "vs_random_std": stdev(diff) if len(diff) > 1 else None,
                     "ahead": sum(d > 0 for d in diff), "draws": len(diff)})
    return rows


def target_innocent_correlation(draws: dict[str, dict[str, list[float | None]]], target: str,
                                innocent: str) -> float | None:
    """Pearson correlation, across masks, of their mean removed share on the target and on the innocent
    domain. Near 1: whatever a mask blocks on the target it blocks as much for the legal user."""
    pairs = []
    for mask, vals in draws.get(target, {}).items():
        t = [v for v in vals if v is not None]
        i = [v for v in draws.get(innocent, {}).get(mask, []) if v is not None]
        if t and i:
            pairs.append((mean(t), mean(i)))
    if len(pairs) < 3:
        return None
    try:
        return correlation(*zip(*pairs, strict=True))
    except StatisticsError:  # one side constant across masks
        return None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    base = DemoConfig.quick() if args.quick else DemoConfig()
    cfg = base.replace(innocent=tuple(args.innocent.split(",")),
                       attacker_steps=args.attacker_steps or base.attacker_steps,
                       learner=base.learner.replace(freeze_ratio=base.learner.freeze_ratio
                                                    if args.freeze_ratio is None else args.freeze_ratio),
                       init=args.init or base.init)
    if args.channels:   # a UNet of another width (pretrained and cached apart), e.g. a capacity-bound one
        width = dataclasses.replace(cfg.pretrain.model, block_out_channels=args.channels)
        cfg = cfg.replace(pretrain=dataclasses.replace(cfg.pretrain, model=width))
    model = toy.pretrained_model(cfg.pretrain, cache_dir=args.model_cache, progress=True)
    loss_fn = toy.make_loss_fn(cfg.pretrain.model)
    # the demo's judge; one that also knows an extra innocent class (cached apart) when one is used
    classes = toy.ALL_CLASSES + tuple(c for c in cfg.innocent if c not in toy.ALL_CLASSES)
    judge = (judge_mod.train_judge(classes, steps=cfg.judge_steps, seed=cfg.seed, cache_dir=args.model_cache,
                                   progress=True) if args.sample_n else None)
    masks = build_masks(cfg, model, loss_fn, random_masks=args.random_masks, learner_seeds=args.learner_seeds,
                        random_ratios=args.random_ratios, parts=args.parts, variants=args.variants)
    domains = toy_domains(cfg.target, cfg.innocent, judge=judge, batch_size=cfg.batch_size, heldout_n=args.heldout_n,
                          sample_n=max(args.sample_n, 1), sample_steps=cfg.sample_steps, guidance=cfg.guidance,
                          prior_share=args.prior_share)
    chosen = [a for a in attacker_choices(cfg) if a.name in args.attackers.split(";")]
    result = evaluate_masks(model, masks, domains, loss_fn, chosen, seed=cfg.seed + 31, attack_seeds=args.attack_seeds,
                            workers=args.workers, progress=True)
    summary = result.summary()
    target, innocent = cfg.target[0], cfg.innocent[0]
    out = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")} | {"target": target},
           "attack_seeds": summary["attack_seeds"], "reliability": summary.get("reliability", {}), "groups": {},
           "draws": {}, "equal_harm": {}}
    shares: dict[str, list[float]] = {}     # per group, the mean share of parameters its masks freeze
    for name, mask in masks.items():
        if mask is not None:
            shares.setdefault(mask_group(name), []).append(mask.ratio("params"))
    out["frozen_share"] = {g: mean(v) for g, v in shares.items()}
    for a in chosen:
        draws = summary["removed_by_draw"][a.name]     # metric -> domain -> mask -> share per draw
        out["draws"][a.name] = draws
        out["groups"][a.name] = {m: group_rows(draws[m], target, innocent) for m in draws}
        if args.random_ratios:
            out["equal_harm"][a.name] = {m: equal_harm_rows(draws[m], target, innocent) for m in draws}
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1%}"


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"Innocent domain: {cfg['innocent']}; freeze ratio {cfg.get('freeze_ratio') or DemoConfig().learner.freeze_ratio}; "
             f"{len(res['attack_seeds'])} attack draws; "
             f"held-out {cfg['heldout_n']} images, {cfg['sample_n']} samples"
             + (f"; {cfg['prior_share']:.0%} of every fine-tune's batch from the base classes" if cfg.get("prior_share")
                else "")
             + (f"; UNet widths {','.join(map(str, cfg['channels']))}" if cfg.get("channels") else "") + ".", ""]
    share = res.get("frozen_share", {})
    target, innocent = cfg.get("target", toy.TARGET_CLASSES[0]), cfg["innocent"].split(",")[0]
    for attacker, per_metric in res["draws"].items():
        rel = next(iter(res["reliability"].get(attacker, {}).values()), {})
        for metric, draws in per_metric.items():
            r = rel.get(metric)
            # recomputed from the draws, so a file written before a column existed prints it too
            rows = group_rows(draws, target, innocent)
            corr = target_innocent_correlation(draws, target, innocent)
            lines.append(f"**{attacker}, {metric}** (reliability of the differences between masks: "
                         + (f"{r['mean_of_draws']:.2f} for the mean of draws, {r['single_draw']:.2f} for one draw"
                            if r else "n/a")
                         + ("" if corr is None else f"; correlation of target and innocent removed share across "
                            f"masks: {corr:.2f}") + ")")
            lines += ["", "| mask | n | removed: target | removed: innocent | selectivity | target − random, per draw "
                      "| x random | draws ahead |", "|---|---|---|---|---|---|---|---|"]
            for row in rows:
                vs = "" if row["group"] == "random" or row["vs_random"] is None else (
                    f"{row['vs_random'] * 100:+.1f} ± {(row['vs_random_std'] or 0.0) * 100:.1f} pts")
                ahead = "" if row["group"] == "random" else f"{row['ahead']} of {row['draws']}"
                label = row["group"] + (f" ({share[row['group']]:.0%} of params)" if row["group"] in share else "")
                times = "" if row.get("times_random") is None else f"{row['times_random']:.2f}x"
                lines.append(f"| {label} | {row['masks']} | {_pct(row['target'])} | {_pct(row['innocent'])} | "
                             f"{_pct(row['selectivity'])} | {vs} | {times} | {ahead} |")
            lines.append("")
            harm = res.get("equal_harm", {}).get(attacker, {}).get(metric)
            if harm and any(row["draws"] or row["beyond_random"] for row in harm):  # not for target-only metrics
                lines += [f"*{attacker}, {metric}: target share blocked beyond random masks at equal harm to the "
                          "innocent domain* (random's points: every random group)", "",
                          "| mask | target − random at equal harm, per draw | x random at equal harm | draws ahead "
                          "| draws past random's most harmful point |", "|---|---|---|---|---|"]
                for row in harm:
                    vs = "n/a" if row["vs_random"] is None else (
                        f"{row['vs_random'] * 100:+.1f} ± {(row['vs_random_std'] or 0.0) * 100:.1f} pts")
                    if row.get("per_mask"):
                        vs += " (each mask: " + ", ".join("n/a" if v is None else f"{v * 100:+.1f}"
                                                          for v in row["per_mask"]) + ")"
                    times = "n/a" if row.get("times_random") is None else f"{row['times_random']:.2f}x"
                    lines.append(f"| {row['group']} | {vs} | {times} | {row['ahead']} of {row['draws']} | "
                                 f"{row['beyond_random']} |")
                lines.append("")
    return "\n".join(lines)


def _number_list(kind: type):
    """An argparse ``type``: "a,b,c" -> a tuple of ``kind`` ("" -> ())."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack-seeds", type=int, default=5, help="draws of the attack's randomness (default 5)")
    p.add_argument("--random-masks", type=int, default=8)
    p.add_argument("--learner-seeds", type=int, default=2)
    p.add_argument("--innocent", default=",".join(toy.INNOCENT_CLASSES),
                   help=f"the innocent (legal) class (default {toy.INNOCENT_CLASSES[0]}; also: triangle)")
    p.add_argument("--attackers", default="standard", help="';'-separated subset of: standard; 10x lr; 3x steps")
    p.add_argument("--attacker-steps", type=int, default=None, help="default: the demo's")
    p.add_argument("--freeze-ratio", type=float, default=None, help="share of parameters frozen (default: the demo's, 0.9)")
    p.add_argument("--random-ratios", type=_number_list(float), default="", metavar="R1,R2",
                   help="random masks also at these freeze ratios, for the comparison at equal innocent harm")
    p.add_argument("--parts", action="store_true",
                   help="also freeze each part of the UNet whole (high-/low-res path, attention, resnets, ...)")
    p.add_argument("--prior-share", type=float, default=0.0,
                   help="share of every fine-tune's batch drawn from the base classes (prior preservation; "
                        "default 0: the demo's single-class fine-tunes)")
    p.add_argument("--init", default=None, choices=STARTS,
                   help="the learner's start (default: the demo's constant logits; uniform: the authors' U[0, 1); a reference name "
                        "starts from that ranking)")
    p.add_argument("--variants", type=_number_list(str), default="", metavar="V1,V2",
                   help="learner variants to compare in one run, each INIT[+density][+wX][+stepsN][+lrX] (the "
                        "innocent weight, learner steps, mask lr; e.g. uniform,constant+density+w0.5), instead "
                        "of the demo's learner (start: --init)")
    p.add_argument("--channels", type=_number_list(int), default="", metavar="C1,C2",
                   help="the toy UNet's block widths (default: the demo's 16,32); each a multiple of 8")
    p.add_argument("--quick", action="store_true", help="the demo's shortened config (a smoke test)")
    p.add_argument("--heldout-n", type=int, default=256, help="held-out images per domain (the demo: 64)")
    p.add_argument("--sample-n", type=int, default=256,
                   help="samples judged per domain (the demo: 32; 0: no sampling, loss metrics only)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-cache", default=None, help="pretrained model + judge cache (default: the demo's)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, metavar="JSON", help="print the tables of a results file and exit")
    args = p.parse_args(argv)
    if any(not 0.0 < r < 1.0 for r in args.random_ratios):
        p.error(f"--random-ratios: each ratio must lie in (0, 1), got {args.random_ratios}")
    if args.channels and (len(args.channels) < 2 or any(c <= 0 or c % 8 for c in args.channels)):
        p.error(f"--channels: two or more widths, each a positive multiple of 8 (the norm groups), got {args.channels}")
    main_ratio = DemoConfig().learner.freeze_ratio if args.freeze_ratio is None else args.freeze_ratio
    if main_ratio in args.random_ratios:
        p.error(f"--random-ratios: {main_ratio} is the freeze ratio itself, whose random masks are always there")
    for v in args.variants:
        try:
            variant_config(DemoConfig(), v)
        except ValueError as exc:
            p.error(f"--variants: {exc}")
    if not 0.0 <= args.prior_share < 1.0:
        p.error(f"--prior-share must lie in [0, 1), got {args.prior_share}")
    if args.markdown:
        print(markdown(json.loads(open(args.markdown).read())))
        return 0
    if args.attack_seeds < 2:
        p.error("--attack-seeds must be >= 2: reliability compares draws")
    known_attackers = [a.name for a in attacker_choices(DemoConfig())]
    if not args.attackers.split(";") or set(args.attackers.split(";")) - set(known_attackers):
        p.error(f"--attackers: ';'-separated names of: {'; '.join(known_attackers)}; got {args.attackers!r}")
    unknown = set(args.innocent.split(",")) - set(toy.ALL_CLASSES + toy.EXTRA_CLASSES)
    if unknown:
        p.error(f"unknown toy class(es) {sorted(unknown)}; known: {', '.join(toy.ALL_CLASSES + toy.EXTRA_CLASSES)}")
    res = run(args)
    if args.json:
        files.write_text(args.json, json.dumps(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
