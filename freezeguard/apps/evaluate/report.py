"""Writing an evaluation: the terminal/Markdown tables and lines, the JSON, and the report folder.

The PNGs (loss curves, sample grid) are drawn by ``apps.evaluate.plots`` (re-exported here);
:func:`write_report` puts everything in one folder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from freezeguard.apps.evaluate.plots import plot_curves, plot_samples  # noqa: F401  (re-exported)
from freezeguard.core import files


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.1%}"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)


def _has_baselines(summary: dict[str, Any]) -> bool:
    return any(m.get("kind") not in (None, "mask", "full") for m in summary["masks"].values())


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2 ** 20:.0f}"


def _group_members(summary: dict[str, Any], group: str) -> list[str]:
    return [m for m in summary["masks"] if m.split("#", 1)[0] == group]


def contender_columns(summary: dict[str, Any], group: str) -> list[str]:
    """Kind, publisher's cost, weight drift from θ_pre and the pre-attack target score of one group."""
    members = _group_members(summary, group)
    info = summary["masks"][members[0]] if members else {}
    cost = info.get("cost")
    cost_s = "" if not cost else f"{cost['seconds']:.1f} s / {_mib(cost.get('peak_bytes'))} MiB"
    if not cost and info.get("kind") in ("mask", "full"):
        cost_s = "~0" if group in ("random", "full") else "n/a"
    wc = info.get("weight_change")
    wc_s = "0" if wc is None and info.get("kind") in ("mask", "full", "data") else (
        "" if wc is None else f"{wc['rel_l2']:.2%} ({wc['tensors_changed']} t)")
    primary = summary["primary_metric"]
    released = ""
    if info.get("released"):
        targets = [d for d, r in summary["domains"].items() if r == "target"]
        vals = [info["released"][d].get(primary) for d in targets if d in info["released"]]
        released = ", ".join(_num(v) for v in vals)
    return [info.get("kind", ""), cost_s, wc_s, released]


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per attacker x mask group (x baseline, with cost and drift columns)."""
    primary = summary["primary_metric"]
    innocent = [d for d, r in summary["domains"].items() if r == "innocent"]
    baselines = _has_baselines(summary)
    header = ["attacker", "contender" if baselines else "mask", "frozen (tensors/params)", f"mitigation ({primary})"]
    header += [f"innocent impact: {d}" for d in innocent] + ["learned / random"]
    if baselines:
        header += ["kind", "publisher cost (time / peak)", "weights moved from θ_pre (rel. L2)",
                   f"released model: target {primary} before attack"]
    rows = []
    for attacker, table in summary["table"].items():
        for group, row in table.items():
            members = _group_members(summary, group)
            rt = sum(summary["masks"][m]["ratio_tensors"] for m in members) / max(len(members), 1)
            rp = sum(summary["masks"][m]["ratio_params"] for m in members) / max(len(members), 1)
            mit = _pct(row["mitigation"])
            if row["n_masks"] > 1 and row.get("mitigation_std") is not None:
                mit += f" ± {row['mitigation_std']:.1%} ({row['n_masks']} seeds)"
            rows.append([attacker, group, f"{rt:.0%} / {rp:.0%}", mit]
                        + [_pct(row["innocent_impact"].get(d)) for d in innocent]
                        + [_num(row.get("vs_random"), ".2f") + "x" if row.get("vs_random") is not None else ""]
                        + (contender_columns(summary, group) if baselines else []))
    return header, rows


def detail_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every metric's removed share, per attacker x mask x domain."""
    metrics = summary["metrics"]
    header = ["attacker", "mask", "domain"] + [f"removed: {m}" for m in metrics] + [f"after: {m}" for m in metrics]
    rows = []
    for attacker, table in summary["table"].items():
        for group, row in table.items():
            for domain in summary["domains"]:
                rem = row["removed"][domain]
                rows.append([attacker, group, domain] + [_pct(rem[m]["mean"]) for m in metrics]
                            + [_num(row["after"][domain][m]) for m in metrics])
    return header, rows


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def headline(summary: dict[str, Any]) -> list[str]:
    """Plain sentences with the figures the issue asks for."""
    lines = []
    for attacker, table in summary["table"].items():
        learned, random = table.get("learned"), table.get("random")
        if not learned:
            continue
        inn = ", ".join(f"{d} {_pct(v)}" for d, v in learned["innocent_impact"].items())
        s = f"{attacker}: learned mask removes {_pct(learned['mitigation'])} of the full fine-tune's target gain"
        if random:
            s += f" (random at the same ratio: {_pct(random['mitigation'])}"
            if learned.get("vs_random") is not None:
                s += f", learned/random = {learned['vs_random']:.2f}x"
            rank = learned.get("random_rank")
            if rank:
                s += (f"; above {rank['beats']} of {rank['n']} random masks, a rank a random mask reaches "
                      f"with chance {rank['p']:.2f}")
            s += ")"
        lines.append(s + f"; innocent impact: {inn}.")
    for attacker, share in summary.get("survival", {}).items():
        lines.append(survival_line(summary, attacker, share))
    for attacker, table in summary["table"].items():
        refs = {g: row["mitigation"] for g, row in table.items() if g.startswith("ref: ")}
        if refs:
            lines.append(f"{attacker}: reference masks at the same ratio: "
                         + ", ".join(f"{g[5:]} {_pct(v)}" for g, v in refs.items()) + ".")
    lines += equal_harm_lines(summary)
    learner = summary.get("learner", {})
    final = learner.get("final", {})
    moved = final.get("frozen_moved")
    if moved is not None:
        start = learner.get("init", "uniform")
        start = {"uniform": "the random U[0, 1) initial logits", "constant": "the constant initial logits (no order)"
                 }.get(start, f"the '{start}' reference ranking it started from")
        share = learner.get("frozen_moved_share")
        unit = "of the frozen parameters" if learner.get("budget_by") == "params" else "of the frozen set"
        lines.append(f"learner: the data moved {moved} of the {learner.get('frozen')} frozen tensors"
                     + (f" ({share:.0%} {unit})" if share is not None else "") + f" away from the mask of {start}"
                     + (" -- none: the learned mask IS that initial mask" if moved == 0 else "")
                     + f"; {final.get('live', 'n/a')} logits still live, soft ratio "
                     + f"{_num(final.get('soft_ratio'))}.")
    elif final.get("mask_moved") is not None:
        lines.append(f"learner: the data moved {final['mask_moved']} tensor(s) in or out of the initial mask.")
    seeds = summary.get("attack_seeds") or [0]
    if len(seeds) > 1:
        lines.append(f"each figure is the mean over {len(seeds)} draws of the attackers' randomness "
                     f"(attack seeds {', '.join(map(str, seeds))}).")
        lines += reliability_lines(summary)
    elif any(t.get("learned") and t.get("random") for t in summary["table"].values()):
        # Every fine-tune shares one draw of the attack's data order and noise; on the toy world
        # another draw moved every mask's figure by tens of points.
        lines.append("caution: these figures come from one draw of the attackers' randomness, shared by every "
                     "mask; another draw can reorder masks closer than random's spread. With --attack-seeds 2 "
                     "or more the report says, per metric, how much of the gaps between masks is reproducible "
                     "(benchmarks/RESULTS.md, 'Evaluation power').")
    return lines


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """The release (what the erase did to the target) and the decision rule's verdict, when the
    summary has them (the demo's relearn world)."""
    lines = []
    erase = summary.get("erase")
    if erase:
        tl = erase["target_loss"]
        lines.append(f"release: {erase['eraser']} erased the target toward {erase['anchor']} ({len(erase['edited'])} "
                     f"tensors edited); target held-out loss {tl['pretrained']:.4f} before the erase, "
                     f"{tl['released']:.4f} after (the share blocked is of what attackers regain from there).")
    verdict = summary.get("verdict")
    if verdict:
        lines += verdict["lines"]
    return lines


def equal_harm_lines(summary: dict[str, Any]) -> list[str]:
    """Per attacker: each mask's target share beyond random masks at the same harm to the legal user
    (``summary["equal_harm"]``, from ``apps.evaluate.equal_harm``), learned first."""
    lines = []
    for attacker, eh in summary.get("equal_harm", {}).items():
        rows = sorted(eh["rows"], key=lambda r: r["group"] != "learned")
        if rows and all(r["vs_random"] is None and r.get("no_curve") for r in rows):
            lines.append(f"{attacker}: no comparison at equal harm: random masks block nothing of the target's "
                         f"{eh['metric']} gain under this attacker, even where they cost {eh['innocent']} most.")
            continue
        parts = []
        for r in rows:
            if r["vs_random"] is None:
                why = ("random masks block nothing of the target under this attacker" if r.get("no_curve")
                       else "more harm than any random mask")
                parts.append(f"{r['group']} n/a ({why})")
            else:
                spread = f" ± {r['vs_random_std'] * 100:.1f}" if r.get("vs_random_std") is not None else ""
                times = f", {r['times_random']:.2f}x random" if r.get("times_random") is not None else ""
                parts.append(f"{r['group']} {r['vs_random'] * 100:+.1f}{spread} pts{times}"
                             + (f" (ahead in {r['ahead']} of {r['draws']} draws)" if r["draws"] > 1 else ""))
        if parts:
            lines.append(f"{attacker}, at equal harm to {eh['innocent']} ({eh['metric']}; random masks at every "
                         f"ratio trace the price of blocking): share of the target's gain blocked beyond random, "
                         f"and as a multiple of random's: "
                         + "; ".join(parts) + ".")
    return lines


def reliability_lines(summary: dict[str, Any]) -> list[str]:
    """Per attacker and target domain: how reproducible the masks' differences are, per metric.

    Primary metric first. Figures are :func:`freezeguard.apps.evaluate.metrics.mask_reliability`
    of the removed shares: the mean over the draws, then one draw in brackets.
    """
    lines = []
    primary = summary["primary_metric"]
    for attacker, per_domain in summary.get("reliability", {}).items():
        for domain, per_metric in per_domain.items():
            parts = [f"{m} {r['mean_of_draws']:.2f} ({r['single_draw']:.2f})"
                     for m in sorted(per_metric, key=lambda m: m != primary) if (r := per_metric[m])]
            if parts:
                lines.append(f"{attacker}, {domain}: reliability of the differences between masks over "
                             f"{len(summary['attack_seeds'])} draws (mean of draws (one draw); near 0: the metric "
                             f"cannot tell these masks apart): " + ", ".join(parts) + ".")
    return lines


def survival_line(summary: dict[str, Any], attacker: str, share: float | None) -> str:
    """How much of the learned mask's mitigation a stronger attacker leaves, said so it means something.

    The share is (mitigation under this attacker) / (mitigation under the standard one). Below
    zero it is not a share: the masked fine-tune then gained *more* than the full one, so none
    survives; that is said, with the mitigation itself, instead of a negative percentage.
    """
    mit = summary["table"].get(attacker, {}).get("learned", {}).get("mitigation")
    if share is None or not math.isfinite(share):
        return (f"{attacker}: share of the learned mask's mitigation that survives: n/a (the standard attacker's "
                "mitigation is not positive, so there is nothing to keep).")
    if share <= 0:
        return (f"{attacker}: none of the learned mask's mitigation survives (its mitigation under this attacker is "
                f"{_pct(mit)}: the masked fine-tune gained at least as much as the full one).")
    return f"{attacker}: {share:.0%} of the learned mask's mitigation survives (relative to the standard attacker)."


def jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    def conv(x):
        if isinstance(x, dict):
            return {str(k): conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple, set)):
            return [conv(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x
    return conv(summary)


def runs_json(result) -> list[dict[str, Any]]:
    return [{"attacker": r.attacker, "mask": r.mask, "domain": r.domain, "role": r.role, "seed": r.seed,
             "before": r.before, "after": r.after, "curve": r.curve} for r in result.runs]


RECOGNISABILITY = (
    "*Recognisability* = the mean probability a judge classifier (trained on real images of every toy "
    "class) gives the domain's class on images the fine-tuned model generates for that domain's prompt: "
    "0 = never recognised, 1 = always. A fine-tune's *gain* is how much it raises that from before.")
PROGRESS_NOTE = (
    "The learner's progress bar shows `m>0.5=`, the *rounded soft mask*: the share of tensors (or "
    "parameters) whose soft mask m = sigmoid(x/T) is above 0.5. The mask written and evaluated here is the "
    "*hard* mask, which takes the top-scored tensors until the budget is met exactly, so the table's frozen "
    "share is the budget while the bar's figure can be lower or higher.")


def write_report(result, summary: dict[str, Any], out_dir: str | Path, *, mask=None) -> Path:
    """Write summary.json, runs.json, the mask file and report.md, then the PNGs.

    Every file is written to a temporary name, fsynced and renamed. The results come first; the
    PNGs are optional: without matplotlib (or if plotting fails) they are skipped with a warning
    and report.md says so, and nothing computed is lost.
    """
    import warnings

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / "summary.json", json.dumps(jsonable(summary), indent=2))
    files.write_text(out / "runs.json", json.dumps(jsonable(runs_json(result)), indent=1))
    if mask is not None:
        mask.save(str(out / "learned_mask.safetensors"))
    files.write_text(out / "report.md", _markdown(summary, curves=False, samples=False))
    plotted = {"curves": False, "samples": False}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: the report's PNGs (loss curves, samples) were skipped; "
                      "pip install matplotlib to get them", RuntimeWarning, stacklevel=2)
        return out
    try:
        with files.atomic_path(out / "loss_curves.png") as tmp:
            plot_curves(result, tmp)
        plotted["curves"] = True
        if result.before_samples:
            with files.atomic_path(out / "samples.png") as tmp:
                plotted["samples"] = plot_samples(result, tmp) is not None
    except Exception as exc:  # optional: the results are already on disk
        warnings.warn(f"a report PNG could not be written ({exc}); the tables and JSON are complete",
                      RuntimeWarning, stacklevel=2)
    files.write_text(out / "report.md", _markdown(summary, **plotted))
    return out


def _markdown(summary: dict[str, Any], *, curves: bool, samples: bool) -> str:
    header, rows = table_rows(summary)
    dheader, drows = detail_rows(summary)
    md = ["# freezeguard evaluation", "",
          f"Primary metric: **{summary['primary_metric']}**. *Mitigation* = share of the full fine-tune's "
          "gain on the target removed by the mask; *innocent impact* = the same share on an innocent "
          "domain (want high mitigation, impact near 0).", ""]
    if summary["primary_metric"] == "recognisability" or "recognisability" in summary.get("metrics", []):
        md += [RECOGNISABILITY, ""]
    if "learner" in summary:
        md += [PROGRESS_NOTE, ""]
    if summary.get("verdict"):
        md += ["## Verdict", "", "```", *verdict_lines(summary), "```", ""]
    md += [f"- {line}" for line in headline(summary)] + ["", format_table(header, rows, markdown=True), "",
                                                         "## Every metric", "",
                                                         format_table(dheader, drows, markdown=True), "",
                                                         "## Attackers", ""]
    md += [f"- {a}: AdamW lr {v['lr']:g}, {v['steps']} steps" for a, v in summary["attackers"].items()]
    md += [""]
    if curves:
        md += ["![held-out loss curves](loss_curves.png)", ""]
    if samples:
        md += ["Samples: the first rows (`real`) are real held-out images of each domain (what recognisable "
               "looks like), then the model's samples before fine-tuning, then after each masked fine-tune.", "",
               "![samples](samples.png)", ""]
    if not curves and not samples:
        md += ["(No PNGs: matplotlib is not installed or plotting failed; the figures above are complete.)", ""]
    if "timings_s" in summary:
        md += ["## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in summary["timings_s"].items()] + [""]
    if "config" in summary:
        md += ["## Configuration", "", "```json", json.dumps(jsonable(summary["config"]), indent=2), "```", ""]
    return "\n".join(md)
