"""Issue 11's sweep: which learner settings make the demo's learned mask beat random freezing?

The demo's toy world (``freezeguard.demo``: pretrained tiny UNet, the publisher's relearn
fine-tune, the toy domains and judge) is built once. Every mask -- full fine-tuning, ``--random-seeds``
random masks, the reference masks (largest mean |Delta|, cross-attention first, one-shot
saliency) and each learner variant for ``--learner-seeds`` seeds -- is evaluated against the same
three attackers: the demo's standard one (AdamW lr 1e-3, 100 steps), 10x its learning rate, and
3x its steps. The attackers, data and metric are fixed here and never depend on the mask.

Each fine-tune's result is cached in ``--cache`` (JSON) under the mask's frozen set, the attacker
and the domain, so full / random / reference runs (and any learned mask equal to one seen
before) are computed once across invocations, and an interrupted sweep resumes.

    OMP_NUM_THREADS=1 python benchmarks/learner_sweep.py --variants "demo;projected rms" --json sweep.json
    python benchmarks/learner_sweep.py --markdown sweep.json        # the table in benchmarks/RESULTS.md

A variant is the demo's ``DemoConfig`` with the changes in ``VARIANTS`` (a learner seed k adds k
to the config's seed: other logit init, batches and noise; same world and attackers).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from statistics import mean, pstdev

import torch

from freezeguard.apps.demo import DemoConfig, learn_mask, publisher_finetune, reference_scores
from freezeguard.apps.evaluate.harness import Attacker, EvalResult, Run, attack_finetune, attacker_suite, measure
from freezeguard.apps.evaluate.metrics import mask_group, removed_share, summarize
from freezeguard.apps.evaluate.toy_domains import toy_domains
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers import judge as judge_mod
from freezeguard.integrations.diffusers import toy

AUTHORS = dict(c_sparsity=5e3, budget="penalty", signal_batches=1, signal_norm=None, init="uniform")
VARIANTS: dict[str, dict] = {
    # the authors' settings (c 5e3): the mask stays the random initial one
    "authors (c 5e3, penalty)": dict(AUTHORS),
    "auto c, penalty": dict(AUTHORS, c_sparsity="auto"),
    "auto c, penalty, mask_lr 1e3": dict(AUTHORS, c_sparsity="auto", mask_lr=1e3),
    "projected, mask_lr 1e3": dict(AUTHORS, budget="projected", mask_lr=1e3),
    "projected, rms 0.05": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.05),
    "projected, rms 0.05, 4 signal batches": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.05,
                                                  signal_batches=4),
    "projected, rms 0.1, 4 signal batches": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.1,
                                                 signal_batches=4),
    "projected, rms 0.02, 4 signal batches": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.02,
                                                  signal_batches=4),
    "projected, rms 0.05, 4 sb, constant init": dict(AUTHORS, budget="projected", signal_norm="rms",
                                                     mask_lr=0.05, signal_batches=4, init="constant"),
    "projected, rms 0.02, 4 sb, delta init": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.02,
                                                  signal_batches=4, init="delta"),
    "projected, rms 0.02, 4 sb, cross-attention init": dict(AUTHORS, budget="projected", signal_norm="rms",
                                                            mask_lr=0.02, signal_batches=4,
                                                            init="cross-attention"),
    "projected, rms 0.02, 4 sb, saliency init": dict(AUTHORS, budget="projected", signal_norm="rms",
                                                     mask_lr=0.02, signal_batches=4, init="saliency"),
    # the demo's default with a simulated user as strong as the 10x-lr attacker, or in between
    "projected, rms 0.05, 4 sb, user_lr 1e-2": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.05,
                                                    signal_batches=4, user_lr=1e-2),
    "projected, rms 0.05, 4 sb, user_lr 3e-3": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.05,
                                                    signal_batches=4, user_lr=3e-3),
    # the demo's default with twice the learner steps (for the data to move more tensors)
    "projected, rms 0.05, 4 sb, 400 steps": dict(AUTHORS, budget="projected", signal_norm="rms", mask_lr=0.05,
                                                 signal_batches=4, learner_steps=400),
}
REFERENCES = ("delta", "cross-attention", "saliency")


def variant_config(base: DemoConfig, variant: dict) -> DemoConfig:
    """``base`` with a variant's changes: ``init`` and ``learner_steps`` are the demo's, the rest the learner's."""
    learner = dict(variant)
    demo = {k: learner.pop(k) for k in ("init", "learner_steps") if k in learner}
    return base.replace(learner=base.learner.replace(**learner), **demo)


def attackers(cfg: DemoConfig) -> list[Attacker]:
    return attacker_suite(cfg.attacker_lr, cfg.attacker_steps, lr_mult=10.0, steps_mult=3.0)


def mask_key(mask: FreezeMask | None) -> str:
    if mask is None:
        return "full"
    return hashlib.sha1("\n".join(mask.frozen_names).encode()).hexdigest()[:16]


class Evaluator:
    """Fine-tune + measure, one (mask, attacker, domain) at a time, cached on disk."""

    def __init__(self, model, loss_fn, domains, attackers_, seed: int, cache_path: Path | None):
        self.model, self.loss_fn, self.domains, self.attackers, self.seed = model, loss_fn, domains, attackers_, seed
        self.cache_path = cache_path
        self.cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
        self.before = {}
        for d in domains:
            m = measure(model, loss_fn, d)
            m.pop("_samples", None)
            self.before[d.name] = m

    def runs(self, name: str, mask: FreezeMask | None) -> list[Run]:
        import copy

        out = []
        for a in self.attackers:
            for d in self.domains:
                key = f"{mask_key(mask)}|{a.name}|{a.lr}|{a.steps}|{d.name}|{self.seed}"
                if key not in self.cache:
                    tuned = copy.deepcopy(self.model)
                    curve = attack_finetune(tuned, mask, d, self.loss_fn, a, seed=self.seed)
                    after = measure(tuned, self.loss_fn, d)
                    after.pop("_samples", None)
                    self.cache[key] = {"after": after, "curve": curve}
                    self._save()
                hit = self.cache[key]
                out.append(Run(a.name, name, d.name, d.role, self.before[d.name], hit["after"],
                               [tuple(p) for p in hit["curve"]]))
        return out

    def _save(self):
        if self.cache_path:
            tmp = self.cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.cache))
            tmp.replace(self.cache_path)


def run(variants: list[str], *, learner_seeds: int, random_seeds: int, cache: Path | None,
        base: DemoConfig | None = None, only: list[str] | None = None, model_cache: str | None = None,
        references_last: bool = False, seed_offset: int = 0, attack_seed: int | None = None,
        progress: bool = False, log=print) -> dict:
    base = base or DemoConfig()
    loss_fn = toy.make_loss_fn(base.pretrain.model)
    judge = judge_mod.train_judge(tuple(toy.ALL_CLASSES), steps=base.judge_steps, seed=base.seed,
                                  cache_dir=model_cache, progress=progress)
    model = toy.pretrained_model(base.pretrain, cache_dir=model_cache, progress=progress)
    ft_state = publisher_finetune(model, base, loss_fn, progress=progress)
    domains = toy_domains(base.target, base.innocent, judge=judge, batch_size=base.batch_size,
                          heldout_n=base.heldout_n, sample_n=base.sample_n, sample_steps=base.sample_steps,
                          guidance=base.guidance)
    chosen = [a for a in attackers(base) if not only or a.name in only]
    # seed_offset > 0: an out-of-sample replication. Other random masks, learner seeds and attack
    # randomness than the ones the settings were chosen on; the world, data and judge stay the same.
    # attack_seed alone: the same masks under other attack randomness (data order, noise).
    attack_seed = base.seed + 31 + seed_offset if attack_seed is None else attack_seed
    ev = Evaluator(model, loss_fn, domains, chosen, attack_seed, cache)
    result = EvalResult(attackers=ev.attackers, primary_metric="recognisability")
    info: dict[str, dict] = {}

    def add(name, mask, extra=None):
        t0 = time.perf_counter()
        runs = ev.runs(name, mask)
        result.runs.extend(runs)
        full = {(r.attacker, r.domain): r for r in result.runs if r.mask == "full"}
        extra = dict(extra or {})
        for r in runs:  # mitigation (target) and innocent impact as they come, for watching a long sweep
            f = full[(r.attacker, r.domain)]
            g = lambda run: run.after["recognisability"] - run.before["recognisability"]  # noqa: E731
            share = removed_share(g(r), g(f), f.before["recognisability"])
            extra[f"{r.attacker}/{r.role}"] = None if share is None else round(share, 3)
        result.masks[name] = ({"ratio_tensors": 0.0, "ratio_params": 0.0} if mask is None else
                              {"ratio_tensors": mask.ratio("tensors"), "ratio_params": mask.ratio("params")})
        info[name] = dict(extra, eval_s=round(time.perf_counter() - t0, 1))
        log(f"[sweep] {name}: {info[name]}")

    add("full", None)
    for k in range(random_seeds):
        add(f"random#{k}", FreezeMask.random(model, base.learner.freeze_ratio, by=base.learner.budget_by,
                                             seed=base.seed + seed_offset + k))
    t0 = time.perf_counter()
    scores = reference_scores(model, ft_state, base, loss_fn, REFERENCES)
    log(f"[sweep] reference rankings in {time.perf_counter() - t0:.1f}s")
    if not references_last:
        for r in REFERENCES:
            add(f"ref: {r}", FreezeMask.from_scores(model, scores[r], base.learner.freeze_ratio, by=base.learner.budget_by))
    for v in variants:
        for s in range(learner_seeds):
            cfg = variant_config(base, VARIANTS[v]).replace(seed=base.seed + seed_offset + s)
            t0 = time.perf_counter()
            mask, logs = learn_mask(model, ft_state, cfg, loss_fn, progress=False, scores=scores)
            last = logs[-1]
            add(f"{v}#{s}", mask, {"learn_s": round(time.perf_counter() - t0, 1), "frozen_moved": last["frozen_moved"],
                                   "frozen_moved_share": round(last["frozen_moved_share"], 3),
                                   "frozen": len(mask.frozen_names), "live": last["live"],
                                   "soft_ratio": round(last["soft_ratio"], 4)})
    if references_last:  # the learned rows first when time is short
        for r in REFERENCES:
            add(f"ref: {r}", FreezeMask.from_scores(model, scores[r], base.learner.freeze_ratio, by=base.learner.budget_by))
    summary = summarize(result)
    # Per learner seed figures (summarize averages a group; the seeds' spread is its std).
    per_seed = {}
    for a in summary["attackers"]:
        for name in result.masks:
            sub = EvalResult(runs=[r for r in result.runs if r.mask in ("full", name) and r.attacker == a],
                             attackers=[x for x in ev.attackers if x.name == a], primary_metric="recognisability",
                             masks={m: result.masks[m] for m in ("full", name)})
            row = summarize(sub)["table"][a][name.split("#", 1)[0]]
            per_seed.setdefault(name, {})[a] = {"mitigation": row["mitigation"],
                                                "innocent": list(row["innocent_impact"].values())}
    return {"config": base.to_json(), "variants": {v: VARIANTS[v] for v in variants}, "info": info,
            "table": summary["table"], "per_mask": per_seed, "learner_seeds": learner_seeds,
            "random_seeds": random_seeds, "seed_offset": seed_offset, "attack_seed": attack_seed}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _ms(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    return f"{100 * mean(vals):+.1f}% ± {100 * pstdev(vals):.1f}" if len(vals) > 1 else _pct(vals[0])


def _groups(names) -> dict[str, list[str]]:
    """Mask names by group (``random#k`` -> "random", a learner variant's seeds -> the variant),
    in the order given, without the full fine-tune."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if name != "full":
            groups.setdefault(mask_group(name), []).append(name)
    return groups


def markdown(res: dict) -> str:
    attackers_ = list(res["table"])
    per = res["per_mask"]
    groups = _groups(per)
    # the learner's settings sit under "learner" (results written before that: flat in the config)
    by = res["config"].get("learner", res["config"])["budget_by"]
    rnd = {a: mean(per[n][a]["mitigation"] for n in groups["random"]) for a in attackers_}
    head = ("| mask | n | " + " | ".join(f"{a}: mitigation | vs random" for a in attackers_)
            + " | innocent impact | frozen moved |")
    lines = [f"Random: {res['random_seeds']} masks; learned: {res['learner_seeds']} learner seeds (mean ± std over "
             "masks/seeds). Mitigation = share of the full fine-tune's recognisability gain on the target removed; "
             "innocent impact = the same on the innocent domain (lower is better). vs random = mean mitigation / "
             "random's mean mitigation.", "", head, "|" + "---|" * (4 + 2 * len(attackers_))]
    for g, names in groups.items():
        cells = [g, str(len(names))]
        for a in attackers_:
            vals = [per[n][a]["mitigation"] for n in names]
            cells.append(_ms(vals))
            m = mean(v for v in vals if v is not None) if any(v is not None for v in vals) else None
            cells.append("" if g == "random" else ("n/a" if m is None or rnd[a] <= 0 else f"{m / rnd[a]:.2f}x"))
        cells.append(_ms([per[n][attackers_[0]]["innocent"][0] for n in names]))
        moved = [res["info"][n].get("frozen_moved") for n in names]
        moved = [m for m in moved if m is not None]
        frozen = [res["info"][n].get("frozen") for n in names if res["info"][n].get("frozen")]
        share = [res["info"][n].get("frozen_moved_share") for n in names]
        share = [x for x in share if x is not None]
        cells.append((f"{mean(moved):.0f} of {mean(frozen):.0f} tensors"
                      + (f" ({100 * mean(share):.0f}% by {by})" if share else ""))
                     if moved else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine(results: list[dict]) -> str:
    """Replicates of one sweep under different attack seeds: every group's mean mitigation per
    replicate, averaged over the replicates, and the paired difference to random within each.

    One attack seed is one draw of the attack's randomness (data order, noise) shared by every mask
    of that replicate, the full fine-tune included; the spread over seeds is what a single-seed table
    hides. Replicates may hold the same masks (``--attack-seed`` only) or other ones as well
    (``--seed-offset``); groups are matched by name.
    """
    seeds = [r.get("attack_seed") or 31 + r.get("seed_offset", 0) for r in results]  # older files: the default
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--combine needs results of distinct attack seeds, got {seeds}")
    common = set.intersection(*(set(r["per_mask"]) for r in results))
    attackers_ = [a for a in results[0]["table"] if all(a in r["table"] for r in results)]
    groups = _groups(sorted(common))
    if "random" not in groups:
        raise SystemExit("--combine: the results share no random masks")

    def per_replicate(names: list[str], value) -> list[float | None]:
        """The group's mean of ``value(entry)`` in each replicate (None where no mask has one)."""
        out = []
        for r in results:
            vals = [v for v in (value(r["per_mask"][n]) for n in names) if v is not None]
            out.append(mean(vals) if vals else None)
        return out

    lines = [f"Attack seeds {', '.join(map(str, seeds))} (one replicate each): each cell is the mean over the "
             f"{len(seeds)} replicates of the group's mean mitigation ± its std across replicates. − random: the "
             "per-replicate difference of the group means, mean ± std, and in how many replicates it is > 0.", "",
             "| mask | n | " + " | ".join(f"{a}: mitigation | {a}: − random (seeds > 0)" for a in attackers_)
             + " | innocent impact |", "|" + "---|" * (3 + 2 * len(attackers_))]
    mitigation = {a: (lambda entry, a=a: entry[a]["mitigation"]) for a in attackers_}
    random_means = {a: per_replicate(groups["random"], mitigation[a]) for a in attackers_}
    for g, names in groups.items():
        cells = [g, str(len(names))]
        for a in attackers_:
            per_seed = per_replicate(names, mitigation[a])
            cells.append(_ms(per_seed))
            if g == "random":
                cells.append("")
                continue
            diffs = [m - rm for m, rm in zip(per_seed, random_means[a], strict=True) if m is not None and rm is not None]
            cells.append(f"{_ms(diffs)} ({sum(d > 0 for d in diffs)} of {len(diffs)})" if diffs else "n/a")
        cells.append(_ms(per_replicate(names, lambda entry: entry[attackers_[0]]["innocent"][0])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=";".join(VARIANTS), help=f"';'-separated, of: {'; '.join(VARIANTS)}")
    p.add_argument("--learner-seeds", type=int, default=3)
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--seed-offset", type=int, default=0,
                   help="add this to every random-mask, learner and attack seed: an out-of-sample replication "
                        "of a sweep whose settings were chosen at offset 0")
    p.add_argument("--attack-seed", type=int, default=None,
                   help="the attackers' seed (data order and noise; default 31 + the seed offset)")
    p.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                   help="print the table averaged over several results files of the same masks under different "
                        "--attack-seed values, with the paired learned-minus-random differences, and exit")
    p.add_argument("--cache", default="learner_sweep_cache.json", help="fine-tune results cache (JSON)")
    p.add_argument("--model-cache", default=None,
                   help="the demo's pretrained model + judge cache (default: $FREEZEGUARD_CACHE or ~/.cache)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, metavar="JSON", help="print the table of a results file and exit")
    p.add_argument("--quick", action="store_true", help="the demo's shortened config (a smoke test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--references-last", action="store_true", help="evaluate the reference masks after the learned ones")
    p.add_argument("--budget-by", choices=("tensors", "params"), default=None,
                   help="the freeze ratio's basis for every mask (default: the demo's)")
    p.add_argument("--attackers", default="", help="';'-separated subset of: standard; 10x lr; 3x steps "
                   "(a cheaper screening run; default all three)")
    args = p.parse_args(argv)
    if args.combine:
        print(combine([json.loads(Path(f).read_text()) for f in args.combine]))
        return 0
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    base = DemoConfig.quick() if args.quick else DemoConfig()
    if args.budget_by:
        base = base.replace(learner=base.learner.replace(budget_by=args.budget_by))
    res = run(variants, learner_seeds=args.learner_seeds, random_seeds=args.random_seeds,
              cache=Path(args.cache) if args.cache else None, base=base,
              only=[a.strip() for a in args.attackers.split(";") if a.strip()] or None, model_cache=args.model_cache,
              references_last=args.references_last, seed_offset=args.seed_offset, attack_seed=args.attack_seed,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
