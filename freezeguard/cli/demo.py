"""`freezeguard demo`: the whole FreezeAsGuard story on the built-in tiny model, in minutes on a CPU."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path

from freezeguard.cli.flags import RenamedSwitch
from freezeguard.cli.threads import apply_threads
from freezeguard.core.values import check_ratio

HELP = ("end-to-end demo on the built-in tiny model and data: pretrain, erase, relearn, learn a mask, attack, "
        "verdict")
DESCRIPTION = (HELP + ". Seeded and deterministic; the pretrained model and judge are cached in the "
               "cache dir, so later runs skip that phase.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="freezeguard-demo", help="report folder (Markdown, PNGs, JSON)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the pretrained toy model and judge are cached "
                             "(default: $FREEZEGUARD_CACHE or ~/.cache/freezeguard)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--quick", action="store_true", help="shortened run (every phase, far fewer steps)")
    # the names of freezeguard.apps.demo.WORLDS (a test keeps them in step; the CLI does not import the
    # demo, with torch and diffusers, to print --help)
    parser.add_argument("--world", choices=("relearn", "new concept", "family relearn", "family new member"),
                        default=None,
                        help="relearn (default, the authors' setting): the model knew the target, the publisher "
                             "erases it with UCE, attackers relearn it; 'new concept': the target was never seen; "
                             "'family relearn' / 'family new member': the same with one member of a family of "
                             "faces the model knows as the target (docs/evaluation.md)")
    parser.add_argument("--ratio", type=float, default=None, help="freeze ratio (default: the demo's, 0.9 of the parameters)")
    parser.add_argument("--budget-by", choices=("tensors", "params"), default=None,
                        help="what the ratio counts, for every mask (default: the demo's, params)")
    parser.add_argument("--strong-lr-mult", type=float, default=None,
                        help="the '<k>x lr' attacker's lr multiplier (default: the demo's, 1 = no such attacker; 10 "
                             "adds it, benchmarks/eval_relearn.py measures it)")
    parser.add_argument("--strong-steps-mult", type=float, default=None,
                        help="the '<k>x steps' attacker's steps multiplier (default: the demo's, 3, which the decision "
                             "rule needs; 1 drops it)")
    parser.add_argument("--baselines", default=None, metavar="LIST",
                        help="baselines compared with the learned mask on the same attackers: comma-separated "
                             "imma, ablation, uce, udp, 'all', or 'none' (default: none, the erase itself is UCE; "
                             "'all' adds every baseline, a few more minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (data, masks, noise)")
    parser.add_argument("--attack-seeds", type=int, default=None,
                        help="repeat the evaluation's fine-tunes under this many draws of the attack's randomness "
                             "and average over them (default 1: one draw, which can move every figure by more than "
                             "the gap between masks; with 2 or more the report says, per metric, how much of "
                             "the gaps between masks is reproducible; each draw adds the evaluation's time)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 0 keeps torch's default. The tiny model's ops are too small to "
                             "share across threads: on a busy 2-core machine one thread was 4-30x faster per step")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes running the evaluation's fine-tunes in parallel (default: the demo's 2, both "
                             "cores of a small machine; the figures do not depend on it)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-progress", dest="quiet", action=RenamedSwitch, new="--quiet", const=True)


class _Usage(ValueError):
    """A bad argument or a missing dependency, said (exit 2) before any work."""


def run(args: argparse.Namespace) -> int:
    try:
        return _run_threads(args)
    except _Usage as exc:
        print(f"freezeguard demo: error: {exc}", file=sys.stderr)
        return 2


def _run_threads(args: argparse.Namespace) -> int:
    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise _Usage(f"the demo needs {' and '.join(missing)}: pip install 'freezeguard[diffusion]'")
    if args.threads < 0:
        raise _Usage(f"--threads must be >= 0, got {args.threads}")
    if args.workers is not None and args.workers < 1:
        raise _Usage(f"--workers must be >= 1, got {args.workers}")
    if args.attack_seeds is not None and args.attack_seeds < 1:
        raise _Usage(f"--attack-seeds must be >= 1, got {args.attack_seeds}")
    with apply_threads(args.threads, None):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from freezeguard.apps.demo import DemoConfig, run_demo
    from freezeguard.apps.evaluate.report import format_table, headline, jsonable, table_rows, verdict_lines
    from freezeguard.apps.plots import plots_available

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.ratio is not None:
        try:
            check_ratio(args.ratio, "--ratio")
        except ValueError as exc:
            raise _Usage(str(exc)) from None
        cfg = cfg.replace(learner=cfg.learner.replace(freeze_ratio=args.ratio))
    if args.budget_by is not None:
        cfg = cfg.replace(learner=cfg.learner.replace(budget_by=args.budget_by))
    for name in ("strong_lr_mult", "strong_steps_mult"):
        value = getattr(args, name)
        if value is not None:
            if not value > 0:
                raise _Usage(f"--{name.replace('_', '-')} must be > 0, got {value}")
            cfg = cfg.replace(**{name: value})
    if args.baselines is not None:
        from freezeguard.apps.baselines.harness import resolve_methods

        if args.baselines.strip() == "none":
            cfg = cfg.replace(baselines=())
        else:
            try:
                cfg = cfg.replace(baselines=tuple(resolve_methods(args.baselines)))
            except ValueError as exc:
                raise _Usage(f"--baselines: {exc}") from None
    if args.world is not None:
        cfg = cfg.replace(world=args.world)
    if args.workers is not None:
        cfg = cfg.replace(workers=args.workers)
    if args.attack_seeds is not None:
        cfg = cfg.replace(attack_seeds=args.attack_seeds)
    cfg = cfg.replace(seed=args.seed)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _Usage(f"--out {out} exists and is not a folder")
    from freezeguard.core import files

    try:  # the report folder is created if need be: its nearest existing folder must take it
        files.check_outputs({"--out": out}, parents=True)
    except files.OutputError as exc:
        raise _Usage(str(exc)) from None
    # Optional dependencies are said up front; the report's tables, JSON and mask never depend on them.
    if not plots_available():
        print("freezeguard demo: warning: matplotlib is not installed, so the report will have no PNGs "
              "(pip install matplotlib); its table, JSON and learned mask are written", file=sys.stderr)
    cache = False if args.no_cache else args.cache_dir
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="matplotlib is not installed", category=RuntimeWarning)
        summary = run_demo(cfg, out_dir=args.out, cache_dir=cache, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
        return 0
    header, rows = table_rows(summary)
    print()
    print(format_table(header, rows))
    print()
    for line in headline(summary):
        print(line)
    print()
    for line in verdict_lines(summary):
        print(line)
    print(f"\ntotal {summary['timings_s']['total']:.0f} s; report written to {summary['report_dir']}/report.md")
    return 0
