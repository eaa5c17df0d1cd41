"""FreezeAsGuard where its authors use it: erase, then freeze against relearning -- with the verdict.

The authors' pipeline on the toy world (docs/evaluation.md): the published model was pretrained
*with* the target class (it knows it, as SD-1.5 knows public figures); the publisher erases it
toward an anchor (``--eraser uce``, the authors'; ``ablation``, Concept Ablation) and releases the
erased model; theta_ft relearns target + innocent from it; the mask is learned between the erased
and the relearned model; every attacker relearns the target from the erased model under a mask.
``--world "new concept"`` is the earlier setting beside it (pretraining never saw the target,
nothing erased). ``--world "family relearn"`` / ``"family new member"``: the same two arms in the second
world, where the target is one member of a family of procedural faces the model knows (the erase's
anchor and the prior class are the family's shared class, "person").

Contenders (all on the erased release unless named): erase only (the reference "full": no mask),
random masks at the freeze ratio and at ``--random-ratios`` (the price curve), the reference
rankings ``--references`` (|delta|, saliency, contrast -- ||delta_target||^2 / ||delta_legal||^2 from
two separate publisher fine-tunes -- and "eraser's tensors": exactly the tensors the eraser changed,
frozen at their own small ratio), the learned mask for ``--learner-seeds`` seeds,
and with ``--no-erase`` the *un-erased* model with no mask and with a mask learned on it (the publisher
skips the erase; shares are still of the erased release's relearning gain, so a negative share means
the attacker ends better off than relearning from the erased release).

Attackers, fixed in ``freezeguard.apps.evaluate.harness.attacker_suite`` and here before any mask
was evaluated: ``standard`` (the demo's user: AdamW, lr 1e-3, 100 steps), ``3x steps``, ``10x lr``,
``LoRA r4`` (rank-4 LoRA on the attention projections the mask leaves trainable, at 10x lr, as
diffusers' LoRA scripts train at 10x a full fine-tune's lr), and two standard users on another target
stream: ``fresh token`` (the target's images bound to a new prompt embedding no eraser edited,
``toy_domains.fresh_token_domain``) and ``prior preservation`` (half of every batch images of the
target's class under its own prompt, DreamBooth's, ``toy_domains.prior_preservation_domain``). Those
two's harm is the standard user's on the legal domain, whose fine-tune does not depend on them.

Every run prints the decision rule (``apps.evaluate.verdict``) and its verdict. Attack draws use
seeds ``--seed-base`` + k; ``--calibrate`` runs only the no-mask relearning on the calibration
seeds (900+) to check the world (does the erase erase, does relearning regain?) before any mask.

    OMP_NUM_THREADS=1 python benchmarks/eval_relearn.py --calibrate
    OMP_NUM_THREADS=1 python benchmarks/eval_relearn.py --json relearn.json
    python benchmarks/eval_relearn.py --markdown relearn.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from statistics import mean

import torch
from eval_power import _number_list, group_rows

from freezeguard.apps.baselines.harness import Protection
from freezeguard.apps.demo import (
    WORLDS,
    DemoConfig,
    learn_mask,
    publisher_finetune,
    random_masks_at,
    reference_scores,
    release,
)
from freezeguard.apps.erase import ERASERS
from freezeguard.apps.evaluate.channel_masks import ChannelMask
from freezeguard.apps.evaluate.equal_harm import equal_harm_rows, group_draws, is_random_group
from freezeguard.apps.evaluate.harness import attacker_suite, evaluate_masks, heldout_loss
from freezeguard.apps.evaluate.metrics import mask_group
from freezeguard.apps.evaluate.toy_domains import fresh_token_domain, prior_preservation_domain, toy_domains
from freezeguard.apps.evaluate.verdict import RULE, decide, figures_from_draws
from freezeguard.core import files
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers import toy

FRESH = "fresh token"
PRIOR = "prior preservation"
LORA = "LoRA r4"
# the standard user on another target stream (its legal harm is the standard user's)
STREAM_ATTACKERS = (FRESH, PRIOR)
ATTACKERS = ("standard", "3x steps", "10x lr", LORA, FRESH, PRIOR)
REFERENCES = ("delta", "saliency", "contrast", "eraser's tensors")
CALIBRATION_SEED_BASE = 900


def _attackers(cfg: DemoConfig, names: list[str]):
    suite = {a.name: a for a in attacker_suite(cfg.attacker_lr, cfg.attacker_steps, lr_mult=10.0, steps_mult=3.0,
                                               lora_rank=4)}
    return [suite[n] for n in names if n not in STREAM_ATTACKERS]


def stream_domains(cfg: DemoConfig, heldout_n: int) -> dict:
    """The target streams of the attackers in STREAM_ATTACKERS (same held-out images as the target's)."""
    target = cfg.target[0]
    return {FRESH: fresh_token_domain(target, batch_size=cfg.batch_size, heldout_n=heldout_n),
            PRIOR: prior_preservation_domain(target, cfg.anchor, batch_size=cfg.batch_size, heldout_n=heldout_n)}


def build_masks(cfg: DemoConfig, pretrained, released, erased, loss_fn, args, log=print) -> dict:
    masks: dict = {"full": None}
    for k in range(args.random_masks):
        masks[f"random#{k}"] = FreezeMask.random(released, cfg.learner.freeze_ratio, by=cfg.learner.budget_by, seed=cfg.seed + k)
    masks.update(random_masks_at(released, args.random_ratios, args.random_masks, by=cfg.learner.budget_by, seed=cfg.seed))
    # random output channels: the finer price curve (the learned mask is also compared against it)
    masks.update({f"channels@{ratio:g}#{k}": ChannelMask.random(released, ratio, seed=cfg.seed + k)
                  for ratio in args.channel_ratios for k in range(args.channel_masks)})
    t0 = time.perf_counter()
    ft_state = publisher_finetune(released, cfg, loss_fn, progress=False)
    log(f"[relearn] publisher's relearn fine-tune: {time.perf_counter() - t0:.0f} s")
    ranked = [r for r in args.references if r != "eraser's tensors"]
    scores = reference_scores(released, ft_state, cfg, loss_fn, tuple(ranked))
    for name in ranked:
        masks[f"ref: {name}"] = FreezeMask.from_scores(released, scores[name], cfg.learner.freeze_ratio, by=cfg.learner.budget_by)
    if "eraser's tensors" in args.references and erased is not None:
        masks["ref: eraser's tensors"] = FreezeMask.from_names(released, erased.edited)
    for s in range(args.learner_seeds):
        t0 = time.perf_counter()
        # a run that evaluates other attackers reuses the very masks of an earlier one (--masks-dir)
        cached = Path(args.masks_dir) / f"{args.world}-{args.eraser}-{cfg.learner.freeze_ratio}-learned{s}.safetensors" \
            if args.masks_dir else None
        if cached is not None and cached.exists():
            masks[f"learned#{s}"] = FreezeMask.load(cached, model=released)
            log(f"[relearn] learner seed {s}: loaded from {cached}")
            continue
        mask, logs = learn_mask(released, ft_state, cfg.replace(seed=cfg.seed + s), loss_fn, progress=False,
                                scores=scores)
        masks[f"learned#{s}"] = mask
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            mask.save(cached, model=released)
        log(f"[relearn] learner seed {s}: {time.perf_counter() - t0:.0f} s; moved {logs[-1]['frozen_moved']} "
            f"tensors; freezes {len(mask.frozen_names)}")
    if args.no_erase and erased is not None:
        # the publisher skips the erase: theta_ft and the mask from the model that still knows the target
        ft0 = publisher_finetune(pretrained, cfg, loss_fn, progress=False)
        mask0, _ = learn_mask(pretrained, ft0, cfg, loss_fn, progress=False)
        masks["no erase (no mask)"] = Protection("model", pretrained, info={"world": "not erased"})
        masks["no erase + learned"] = Protection("model", pretrained, mask=mask0, info={"world": "not erased"})
    return masks


def _frozen_share(contender) -> float:
    """The share of parameters a contender freezes (a Protection without a mask freezes none)."""
    mask = contender.mask if isinstance(contender, Protection) else contender
    return 0.0 if mask is None else mask.ratio("params")


def _losses(models: dict, loss_fn, domains) -> dict:
    return {m: {d.name: heldout_loss(model, loss_fn, d.heldout) for d in domains} for m, model in models.items()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    base = DemoConfig.quick() if args.quick else DemoConfig()
    cfg = base.replace(world=args.world, eraser=args.eraser,
                       learner=base.learner.replace(freeze_ratio=args.freeze_ratio))
    if args.pretrain_steps:
        cfg = cfg.replace(pretrain=dataclasses.replace(cfg.pretrain, steps=args.pretrain_steps))
    loss_fn = toy.make_loss_fn(cfg.pretrain.model)
    t0 = time.perf_counter()
    pretrained, released, erased = release(cfg, args.model_cache, progress=True)
    target, innocent = cfg.target[0], cfg.innocent[0]
    domains = toy_domains(cfg.target, cfg.innocent, batch_size=cfg.batch_size, heldout_n=args.heldout_n)
    streams = stream_domains(cfg, args.heldout_n)
    names = args.attackers.split(";")
    out = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
           | {"target": target, "innocent": innocent, "fresh": streams[FRESH].name, "rule": RULE,
              "streams": {a: d.name for a, d in streams.items()}, "anchor": cfg.anchor},
           "erase": {"edited": erased.edited if erased else [], "config": erased.config if erased else {}},
           "losses_released": _losses({"pretrained": pretrained, "released": released}, loss_fn,
                                      domains + [streams[FRESH]])}
    print(f"[relearn] held-out loss before any attack: {json.dumps(out['losses_released'])}", flush=True)
    if args.calibrate:
        seed = CALIBRATION_SEED_BASE
        masks: dict = {"full": None}
    else:
        seed = args.seed_base
        masks = build_masks(cfg, pretrained, released, erased, loss_fn, args)
    out["config"]["seed_base"] = seed
    chosen = _attackers(cfg, names)
    res = evaluate_masks(released, masks, domains, loss_fn, chosen, seed=seed, attack_seeds=args.attack_seeds,
                         workers=args.workers, progress=True)
    summary = res.summary()
    draws = {a: summary["removed_by_draw"][a].get("loss", {}) for a in summary["removed_by_draw"]}
    # what relearning without a mask regains (the denominator of every share), per attacker, domain and draw
    out["relearning"] = {a: {d.name: [{m: [r.before[m], r.after[m]] for m in r.before} for r in res.runs
                                      if r.mask == "full" and r.attacker == a and r.domain == d.name]
                             for d in domains} for a in summary["table"]}
    after = {a: {g: row["after"] for g, row in summary["table"][a].items()} for a in summary["table"]}
    for name in (n for n in names if n in STREAM_ATTACKERS):
        dom = streams[name]
        fres = evaluate_masks(released, masks, [dom], loss_fn, _attackers(cfg, ["standard"]), seed=seed,
                              attack_seeds=args.attack_seeds, workers=args.workers, progress=True)
        fsum = fres.summary()
        out["relearning"][name] = {dom.name: [{m: [r.before[m], r.after[m]] for m in r.before}
                                              for r in fres.runs if r.mask == "full"]}
        # the legal user's fine-tune does not depend on the attacker's stream: its draws are the standard user's
        draws[name] = {dom.name: fsum["removed_by_draw"]["standard"].get("loss", {}).get(dom.name, {}),
                       innocent: draws["standard"].get(innocent, {})}
        after[name] = {g: row["after"] for g, row in fsum["table"]["standard"].items()}
    out |= {"draws": draws, "after": after, "seconds": time.perf_counter() - t0,
            "frozen_share": {g: mean(_frozen_share(m) for n, m in masks.items() if m is not None and mask_group(n) == g)
                             for g in {mask_group(n) for n, m in masks.items() if m is not None}}}
    return out


def _target_of(res: dict, attacker: str) -> str:
    streams = res["config"].get("streams") or {FRESH: res["config"]["fresh"]}   # older files: fresh only
    return streams.get(attacker, res["config"]["target"])


def verdict_of(res: dict):
    innocent = res["config"]["innocent"]
    figures = {a: figures_from_draws(d[_target_of(res, a)], d[innocent]) for a, d in res["draws"].items()
               if _target_of(res, a) in d and innocent in d}
    return decide(figures), figures


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:+.1%}"


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return mean(vals) if vals else None


def _spread(per_draw) -> str:
    """" (a, b, c per draw)" when there are several draws."""
    vals = [v for v in per_draw if v is not None]
    return "" if len(vals) < 2 else " (" + ", ".join(f"{v * 100:+.1f}" for v in vals) + " per draw)"


def markdown(res: dict) -> str:
    cfg = res["config"]
    innocent = cfg["innocent"]
    rel = res["losses_released"]
    runs = res.get("runs") or [{k: cfg[k] for k in ("attackers", "attack_seeds", "seed_base", "learner_seeds")}
                                | {"minutes": round(res["seconds"] / 60)}]
    lines = [f"World: {cfg['world']}; eraser {cfg['eraser'] if WORLDS[cfg['world']].erases else 'none'}; freeze ratio "
             f"{cfg['freeze_ratio']}; held-out {cfg['heldout_n']} images. Runs: " + "; ".join(
                 f"{r['attackers']}: {r['attack_seeds']} attack draws (seeds {r['seed_base']}+), "
                 f"{r['learner_seeds']} learner seeds, {r['minutes']} min" for r in runs) + ".", "",
             "Held-out loss before any attack (lower = the model draws it): " + "; ".join(
                 f"{m}: " + ", ".join(f"{d} {v:.4f}" for d, v in per.items()) for m, per in rel.items()), ""]
    for attacker, per_domain in res.get("relearning", {}).items():
        lines.append(f"Relearning with no mask, {attacker} (before -> after, per draw): " + "; ".join(
            f"{d}: " + ", ".join(f"{m} " + " / ".join(f"{r[m][0]:.4f} -> {r[m][1]:.4f}" for r in runs)
                                 for m in (runs[0] if runs else {})) for d, runs in per_domain.items()))
    lines.append("")
    share = res.get("frozen_share", {})
    for attacker, draws in res["draws"].items():
        tname = _target_of(res, attacker)
        if tname not in draws:
            continue
        rows = {r["group"]: r for r in group_rows(draws, tname, innocent)}
        t_draw, i_draw = group_draws(draws[tname]), group_draws(draws[innocent])
        harm = {r["group"]: r for r in equal_harm_rows(draws, tname, innocent)}
        # with output-channel random masks: each group against their curve too
        channels = {r["group"]: r for r in equal_harm_rows(draws, tname, innocent, curve="channels")} \
            if any(is_random_group(g, "channels") for g in t_draw) else {}
        after = res.get("after", {}).get(attacker, {})
        extra = (" | x channel random at equal harm", "|---") if channels else ("", "")
        lines += [f"**{attacker}** (target: {tname}; removed share of the relearning gain of the erase-only release; "
                  "x random at equal harm: the group's target share over random's interpolated at its harm)", "",
                  "| contender | params frozen | target blocked | legal harm | x random, same ratio | "
                  f"x random at equal harm{extra[0]} | target loss after attack |",
                  f"|---|---|---|---|---|---{extra[1]}|---|"]
        t_after = after.get("full", {}).get(tname, {}).get("loss")
        lines.append(f"| erase only (no mask) | 0% | 0% (reference) | 0% (reference) | | |{' |' if channels else ''} "
                     f"{'n/a' if t_after is None else f'{t_after:.4f}'} |")
        for g, row in rows.items():
            eh = harm.get(g, {})
            t_after = after.get(g, {}).get(tname, {}).get("loss")
            times = "" if row.get("times_random") is None else f"{row['times_random']:.2f}x"
            eht = "" if g.startswith("random") else ("n/a" if eh.get("times_random") is None else
                                                      f"{eh['times_random']:.2f}x")
            if channels:
                ch = channels.get(g, {})
                eht += " | " + ("" if g.startswith("channels") else
                                "n/a" if ch.get("times_random") is None else f"{ch['times_random']:.2f}x")
            lines.append(f"| {g} ({row['masks']}) | {share.get(g, 0):.0%} | {_pct(row['target'])}{_spread(t_draw[g])} | "
                         f"{_pct(row['innocent'])}{_spread(i_draw.get(g, []))} | {times} | {eht} | "
                         f"{'n/a' if t_after is None else f'{t_after:.4f}'} |")
        seeds = {m: vals for m, vals in draws[tname].items() if mask_group(m) == "learned"}
        if len(seeds) > 1:
            lines += ["", "Learned mask per learner seed (mean over draws): target " + ", ".join(
                f"{_pct(_mean(v))} / harm {_pct(_mean(draws[innocent][m]))}" for m, v in seeds.items())]
        lines.append("")
    if any(g.startswith("learned") for d in res["draws"].values() for dom in d.values() for g in dom):
        verdict, _ = verdict_of(res)
        lines += ["```", *verdict.lines(), "```"]
    return "\n".join(lines)


def merge(results: list[dict]) -> dict:
    """Several result files of one world and eraser as one: their attackers side by side (e.g. one run
    for the standard and fresh-token attackers, one for 3x steps, on the same learned masks), more draws
    of an attacker (another ``--seed-base``), more contenders under the same draws. Values are keyed by
    attack seed, so a contender measured in two files under the same seed counts once; a contender
    must have every draw its attacker has (else the merge says so)."""
    first = results[0]
    out = dict(first) | {"draws": {}, "after": {}, "relearning": {}, "runs": []}
    by_seed: dict = {}        # attacker -> domain -> mask -> seed -> share
    for res in results:
        for key in ("world", "eraser", "freeze_ratio"):
            if res["config"][key] != first["config"][key]:
                raise ValueError(f"cannot merge results of another {key}: {res['config'][key]} vs {first['config'][key]}")
        cfg = res["config"]
        seeds = list(range(cfg["seed_base"], cfg["seed_base"] + cfg["attack_seeds"]))
        out["runs"].append({k: cfg[k] for k in ("attackers", "attack_seeds", "seed_base", "learner_seeds")}
                           | {"minutes": round(res["seconds"] / 60)})
        for attacker, per_domain in res["draws"].items():
            for domain, per_mask in per_domain.items():
                for mask, vals in per_mask.items():
                    by_seed.setdefault(attacker, {}).setdefault(domain, {}).setdefault(mask, {}).update(
                        zip(seeds, vals, strict=True))
        for attacker, runs in res.get("relearning", {}).items():
            for domain, vals in runs.items():
                out["relearning"].setdefault(attacker, {}).setdefault(domain, {}).update(zip(seeds, vals, strict=True))
        for attacker, rows in res.get("after", {}).items():
            into = out["after"].setdefault(attacker, {})
            for g, row in rows.items():
                into.setdefault(g, row)     # the first file's (after-attack losses are illustrative)
        out["frozen_share"] = out.get("frozen_share", {}) | res.get("frozen_share", {})
    for attacker, per_domain in by_seed.items():
        seeds = sorted({s for per_mask in per_domain.values() for vals in per_mask.values() for s in vals})
        for domain, per_mask in per_domain.items():
            for mask, vals in per_mask.items():
                if set(vals) != set(seeds):
                    raise ValueError(f"{attacker} / {domain} / {mask}: measured under seeds {sorted(vals)}, the "
                                     f"attacker under {seeds}; run it under the same seeds")
                out["draws"].setdefault(attacker, {}).setdefault(domain, {})[mask] = [vals[s] for s in seeds]
    out["relearning"] = {a: {d: [v[s] for s in sorted(v)] for d, v in per.items()}
                         for a, per in out["relearning"].items()}
    out["seconds"] = sum(r["seconds"] for r in results)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=WORLDS, default="relearn")
    p.add_argument("--eraser", choices=ERASERS, default="uce")
    p.add_argument("--freeze-ratio", type=float, default=DemoConfig().learner.freeze_ratio)
    p.add_argument("--attackers", default=";".join(ATTACKERS), help=f"';'-separated subset of {'; '.join(ATTACKERS)}")
    p.add_argument("--attack-seeds", type=int, default=3)
    p.add_argument("--seed-base", type=int, default=31, help="first attack seed (the demo's; calibration uses 900+)")
    p.add_argument("--learner-seeds", type=int, default=3)
    p.add_argument("--random-masks", type=int, default=2, help="random masks per freeze ratio")
    p.add_argument("--random-ratios", type=_number_list(float), default=(0.5, 0.7, 0.8, 0.95),
                   help="random masks also at these freeze ratios (the price curve)")
    p.add_argument("--channel-ratios", type=_number_list(float), default=(),
                   help="freeze ratios of random output-channel masks (comma-separated; default: none)")
    p.add_argument("--channel-masks", type=int, default=2, help="random output-channel masks per ratio")
    p.add_argument("--references", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
                   default=REFERENCES, help=f"comma-separated subset of {', '.join(REFERENCES)}")
    p.add_argument("--no-erase", action="store_true",
                   help="also the un-erased model, with no mask and with a mask learned on it (theta_ft from it)")
    p.add_argument("--calibrate", action="store_true", help="no masks: relearning alone, on the calibration seeds")
    p.add_argument("--quick", action="store_true", help="the demo's shortened config (a smoke test)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="the published model's pretraining steps (default: the demo's; the family world's tables "
                        "use the value its calibration chose, see RESULTS.md)")
    p.add_argument("--heldout-n", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-cache", default=None)
    p.add_argument("--masks-dir", default=None,
                   help="save the learned masks here, and load them when present (runs over other attackers)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, metavar="JSON[,JSON]",
                   help="print the tables of a results file (or several, merged: see merge()) and exit")
    args = p.parse_args(argv)
    if args.markdown:
        results = [json.loads(open(path).read()) for path in args.markdown.split(",")]
        print(markdown(results[0] if len(results) == 1 else merge(results)))
        return 0
    names = args.attackers.split(";")
    if set(names) - set(ATTACKERS) or (set(names) & set(STREAM_ATTACKERS) and "standard" not in names):
        p.error(f"--attackers: subset of {'; '.join(ATTACKERS)} ({' and '.join(STREAM_ATTACKERS)} need standard: "
                f"their harm is the standard user's), got {args.attackers!r}")
    if set(args.references) - set(REFERENCES):
        p.error(f"--references: subset of {', '.join(REFERENCES)}")
    if args.channel_ratios and LORA in names:
        p.error(f"--channel-ratios: output-channel masks cannot face the {LORA} attacker (not modelled); "
                "run it without them")
    if args.freeze_ratio in args.random_ratios:
        p.error("--random-ratios must not repeat --freeze-ratio (its random masks are always there)")
    res = run(args)
    if args.json:
        files.write_text(args.json, json.dumps(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
