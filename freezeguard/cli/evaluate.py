"""`freezeguard evaluate`: how much does a mask hold back a fine-tune, against random freezing?"""
from __future__ import annotations

import argparse
import json
import sys

HELP = "simulate user fine-tunes under no mask / random masks / your mask; report mitigation and innocent impact"
DESCRIPTION = (
    HELP + ". Without --pretrained it evaluates a mask for the built-in toy model (see `freezeguard demo`), "
    "with sample recognisability judged by the built-in classifier. With --pretrained (a local diffusers "
    "Stable Diffusion folder) and imagefolder data it reports held-out denoising loss and prompt gain; "
    "CLIP score / FID are skipped (they need local judge weights, not taken by this build)."
)


def _ratio_list(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask", required=True, help="mask file (.safetensors) to evaluate")
    parser.add_argument("--pretrained", default=None, help="local diffusers SD folder (default: the built-in toy model)")
    parser.add_argument("--target-data", default=None, help="imagefolder of the target domain (with --pretrained)")
    parser.add_argument("--innocent-data", action="append", default=[],
                        help="imagefolder of an innocent domain (repeat for several; with --pretrained)")
    parser.add_argument("--heldout", type=int, default=None,
                        help="held-out images per domain (default: 64 generated for the toy model; "
                             "the last 4 of each imagefolder for real models)")
    parser.add_argument("--samples", type=int, default=32, help="toy model: images generated per domain for the judge")
    parser.add_argument("--sample-steps", type=int, default=15, help="toy model: DDIM steps per generated image")
    parser.add_argument("--resolution", type=int, default=None, help="resize + centre-crop images (real models)")
    parser.add_argument("--lr", type=float, default=1e-3, help="simulated user's AdamW learning rate")
    parser.add_argument("--steps", type=int, default=100, help="simulated user's fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--strong-lr-mult", type=_ratio_list, default=10.0,
                        help="the '<k>x lr' attacker's lr multiplier (1 drops it)")
    parser.add_argument("--strong-steps-mult", type=_ratio_list, default=3.0,
                        help="the '<k>x steps' attacker's steps multiplier (1 drops it)")
    parser.add_argument("--no-strong", action="store_true", help="evaluate against the standard attacker only")
    parser.add_argument("--random-seeds", type=int, default=3, help="random masks at the same ratio")
    parser.add_argument("--budget-by", choices=("tensors", "params"), default="params",
                        help="the random masks match the mask's share of tensors or of parameters")
    parser.add_argument("--cache-dir", default=None, help="cache of the toy model and judge")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (data, masks, noise)")
    parser.add_argument("--out", default=None, help="report folder (Markdown, PNGs, JSON)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _attackers(args):
    from freezeguard.apps.evaluate.harness import attacker_suite

    if args.no_strong:
        return attacker_suite(args.lr, args.steps, lr_mult=1.0, steps_mult=1.0)
    return attacker_suite(args.lr, args.steps, lr_mult=args.strong_lr_mult, steps_mult=args.strong_steps_mult)


def _toy_setup(args):
    from freezeguard.apps.evaluate.toy_domains import toy_domains
    from freezeguard.integrations.diffusers import judge, toy

    model = toy.pretrained_model(cache_dir=args.cache_dir, progress=not args.quiet)
    j = judge.train_judge(cache_dir=args.cache_dir, progress=not args.quiet)
    domains = toy_domains(judge=j, batch_size=args.batch_size, heldout_n=args.heldout or 64,
                          sample_n=args.samples, sample_steps=args.sample_steps, seed=1000 + args.seed)
    return model, toy.make_loss_fn(), domains


def _real_setup(args, device):
    from freezeguard.apps.evaluate.imagefolder_domains import imagefolder_domains
    from freezeguard.integrations.diffusers import load_components

    if not args.target_data:
        raise SystemExit("freezeguard evaluate: --pretrained needs --target-data (and usually --innocent-data)")
    comps = load_components(args.pretrained).to(device)
    print("freezeguard evaluate: CLIP score / FID skipped: they need local judge weights, which this build "
          "does not take; reporting held-out denoising loss and prompt gain.", file=sys.stderr)
    domains = imagefolder_domains(comps, args.target_data, args.innocent_data, heldout=args.heldout or 4,
                                  batch_size=args.batch_size, resolution=args.resolution, seed=args.seed)
    return comps.unet, comps.loss_fn(), domains


def run(args: argparse.Namespace) -> int:
    import torch

    from freezeguard.apps.evaluate.harness import evaluate_masks
    from freezeguard.apps.evaluate.report import format_table, headline, jsonable, table_rows, write_report
    from freezeguard.core.mask import FreezeMask

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.pretrained:
        model, loss_fn, domains = _real_setup(args, device)
    else:
        model, loss_fn, domains = _toy_setup(args)
        model.to(device)
    mask = FreezeMask.load(args.mask, model=model)
    ratio = mask.ratio(args.budget_by)
    masks = {"full": None}
    for k in range(args.random_seeds):
        masks[f"random#{k}"] = FreezeMask.random(model, ratio, by=args.budget_by, seed=args.seed + k)
    masks["learned"] = mask
    torch.manual_seed(args.seed)
    result = evaluate_masks(model, masks, domains, loss_fn, _attackers(args), seed=args.seed,
                            progress=not args.quiet)
    summary = result.summary()
    if args.out:
        summary["report_dir"] = str(write_report(result, summary, args.out))
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
        return 0
    print(format_table(*table_rows(summary)))
    print()
    print("\n".join(headline(summary)))
    if args.out:
        print(f"report written to {summary['report_dir']}/report.md")
    return 0
