"""``learn()``: the publisher's whole mask-learning run on a local Stable Diffusion folder.

What ``freezeguard learn`` does, as a Python function: check every input that needs no model
(options, folders, that --finetuned is a fine-tune of --pretrained, from the safetensors headers
alone), load the pipeline and the data, run the :class:`MaskLearner` (resumable from a state
file), then write the mask (atomically), the state, the soft-mask plot and a per-step JSONL log.
Errors that are the caller's input raise :class:`LearnInputError` before any long work; the
messages name the ``freezeguard learn`` flag of each input (the parameter of the same name).

Example:
    >>> config = LearnerConfig(freeze_ratio=0.3, budget="projected", signal_norm="rms", mask_lr=0.05)
    >>> summary = learn("sd15/", "sd15-ft/", "data/target", "data/innocent", "mask.safetensors", config,
    ...                 steps=400)                                                    # doctest: +SKIP
    >>> summary["frozen_tensors"], summary["mask_moved"]                              # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from freezeguard.apps.learn import reference_masks, state_io
from freezeguard.apps.learn.config import LearnerConfig
from freezeguard.apps.learn.learner import MaskLearner
from freezeguard.apps.learn.mask_rules import check_rule
from freezeguard.apps.plots import plots_available
from freezeguard.core import files
from freezeguard.core.mask import FreezeMask, describe_layout_mismatch
from freezeguard.core.weights import DENOISER_SUBFOLDERS, WeightsError, load_tensors, weights_layout
from freezeguard.integrations.diffusers.data import DatasetError, ImageFolderDataset, mixed_batches
from freezeguard.integrations.diffusers.pipeline import PipelineError, load_components


class LearnInputError(ValueError):
    """Bad input to :func:`learn`, reported before any long work."""


def _unet_dir(path: str | Path, flag: str) -> Path:
    """The denoiser folder: the pipeline's unet/ (SD-1.x/2.x, SDXL) or transformer/ (SD3, Flux), or the folder."""
    root = Path(path)
    if not root.is_dir():
        raise LearnInputError(f"{flag} {root} does not exist (a local diffusers folder is needed; nothing is "
                              "downloaded)")
    for cand in [root / sub for sub in DENOISER_SUBFOLDERS] + [root]:
        if (cand / "config.json").is_file():
            return cand
    raise LearnInputError(f"{flag} {root} is neither a diffusers pipeline folder (unet/ or transformer/ with a "
                          "config.json) nor a denoiser folder")


def _layout(unet_dir: Path, flag: str) -> dict[str, tuple[int, ...]]:
    """name -> shape from the safetensors headers, without loading any weight (pickles refused)."""
    try:
        return weights_layout(unet_dir, flag)
    except WeightsError as exc:
        raise LearnInputError(str(exc)) from None


def check_learn_inputs(pretrained: str | Path, finetuned: str | Path, target_data: str | Path,
                       innocent_data: str | Path, out: str | Path, *, steps: int, batch_size: int,
                       hard_mask: str = "topk", state: str | Path | None = None, checkpoint_every: int = 0,
                       resume: str | Path | None = None) -> tuple[Path, Path, Path]:
    """Every check that needs no model loaded, beside the LearnerConfig's own (made when it was
    built); returns (pipeline folder, fine-tuned unet folder, out)."""
    if steps < 1:
        raise LearnInputError(f"--steps must be >= 1, got {steps}")
    if batch_size < 2:
        raise LearnInputError(f"--batch-size must be >= 2 (each batch mixes target and innocent images), "
                              f"got {batch_size}")
    try:
        check_rule(hard_mask)
    except ValueError as exc:
        raise LearnInputError(f"--hard-mask: {exc}") from None
    if checkpoint_every < 0 or (checkpoint_every and not state):
        raise LearnInputError("--checkpoint-every needs --state and must be >= 0")
    for flag, path in (("--target-data", target_data), ("--innocent-data", innocent_data)):
        if not Path(path).is_dir():
            raise LearnInputError(f"{flag} {path} does not exist (or is not a folder)")
    if resume and not Path(resume).is_file():
        raise LearnInputError(f"--resume {resume} does not exist")
    out = Path(out)
    if out.is_dir():
        raise LearnInputError(f"--out {out} is a folder; give a file name such as mask.safetensors")
    if not out.parent.exists():
        raise LearnInputError(f"--out: folder {out.parent} does not exist")
    pre_dir = _unet_dir(pretrained, "--pretrained")
    ft_dir = _unet_dir(finetuned, "--finetuned")
    mismatch = describe_layout_mismatch(_layout(pre_dir, "--pretrained"), _layout(ft_dir, "--finetuned"),
                                        missing="missing from --finetuned", extra="not in --pretrained",
                                        reshaped="shapes differ", arrow="vs", limit=5)
    if mismatch:
        raise LearnInputError(f"--finetuned is not a fine-tune of --pretrained ({mismatch})")
    return Path(pretrained), ft_dir, out


# Hyperparameters a resumed run may change with override_hparams=True (the learner simply continues
# with them); the others change what the saved state means (budget, user optimizer, data order).
# Settings a resumed run may change with --override-hparams (step sizes and the schedule), and
# the ones that define the search itself and never change mid-run (every other LearnerConfig field).
OVERRIDABLE = ("temperature", "c_sparsity", "mask_lr", "user_lr", "user_interval")
FIXED = ("freeze_ratio", "budget_by", "user_optimizer", "seed", "budget", "signal_batches", "signal_norm",
         "signal_density", "init", "innocent_weight", "user_betas", "user_eps", "user_weight_decay")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_resume(resume: str | Path, wanted: dict[str, Any], *, override_hparams: bool = False) -> dict[str, Any]:
    """The hyperparameters to override on resume ({} when none); LearnInputError for a refused change.

    Read from the state file's metadata alone, before any model is loaded. A change of a FIXED
    hyperparameter is always refused; of an OVERRIDABLE one, unless ``override_hparams``.
    """
    try:
        saved, _ = state_io.saved_hparams(resume)
    except (ValueError, FileNotFoundError) as exc:
        raise LearnInputError(f"--resume: {exc}") from None
    changes = state_io.hparam_changes(saved, wanted)
    fixed = {k: v for k, v in changes.items() if k in FIXED}
    if fixed:
        said = ", ".join(f"{_flag(k)} {old} (this run: {new})" for k, (old, new) in fixed.items())
        raise LearnInputError(f"--resume state {resume} was learned with {said}; these cannot change on resume "
                              f"(start a new run instead)")
    if changes and not override_hparams:
        said = ", ".join(f"{_flag(k)} {old} (this run: {new})" for k, (old, new) in changes.items())
        raise LearnInputError(f"--resume state {resume} was learned with {said}; pass the same values to "
                              f"continue, or --override-hparams to continue with this run's")
    return {k: new for k, (_, new) in changes.items()}


def check_outputs(out: Path, *, state: str | Path | None, log: str | Path | None, plot: str | Path | None,
                  resume: str | Path | None, inputs: dict[str, str | Path | None] | None = None) -> tuple[Path, Path]:
    """Output paths: distinct files in existing writable folders, none of them an input or inside an
    input folder (``inputs``: flag -> path), the resumed state only as --state; returns (log, plot)."""
    log_path = Path(log) if log else out.with_name(out.name + ".log.jsonl")
    plot_path = Path(plot) if plot else out.with_name(out.name + ".png")
    named = {"--out": out, "--log": log_path, "--plot": plot_path}
    if state:
        named["--state"] = Path(state)
    for flag, path in named.items():
        if path.is_dir():
            raise LearnInputError(f"{flag} {path} is a folder; give a file name")
    try:
        files.check_outputs(named, inputs or {})
    except files.OutputError as exc:
        raise LearnInputError(str(exc)) from None
    if resume:
        seen = {path.resolve(): flag for flag, path in named.items()}
        if seen.get(Path(resume).resolve(), "--state") != "--state":
            raise LearnInputError(f"--resume {resume} is also {seen[Path(resume).resolve()]}; it would be overwritten")
    return log_path, plot_path


def _keep_log_until(log_path: Path, done: int) -> None:
    """Drop log lines of steps at or after the resumed checkpoint (they run again), atomically."""
    if not log_path.is_file():
        files.write_text(log_path, "")
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a line cut short by the interruption
        if isinstance(step, int) and step < done:
            kept.append(line)
    files.write_text(log_path, "".join(x + "\n" for x in kept))


def _check_ranking(ranking: str | None, config: LearnerConfig) -> None:
    """``ranking`` names a reference ranking, and goes with ``init="scores"`` (and only with it)."""
    rankings = ", ".join(reference_masks.RANKINGS)
    if ranking is not None and ranking not in reference_masks.RANKINGS:
        raise LearnInputError(f"--init must be uniform, constant, {rankings}; got {ranking!r}")
    if ranking is None and config.init == "scores":
        raise LearnInputError(f"init='scores' needs a ranking ({rankings})")
    if ranking is not None and config.init != "scores":
        raise LearnInputError(f"the ranking {ranking!r} is a start for init='scores', not init={config.init!r}")


def _load_learner(pre_root: Path, ft_dir: Path, target_data: str | Path, innocent_data: str | Path,
                  config: LearnerConfig, *, ranking: str | None, resume: str | Path | None, resolution: int | None,
                  caption_column: str, backend: str, device: torch.device
                  ) -> tuple[MaskLearner, torch.nn.Module, ImageFolderDataset, ImageFolderDataset]:
    """The pipeline, the two image folders and the learner (new, or restored from ``resume``).

    Returns (learner, unet, target, innocent); the caller's mistakes in the files (a dataset that
    does not match, a pipeline that does not load, a state of another model) as LearnInputError.
    """
    try:
        comps = load_components(pre_root, dtype=torch.float32)
        data_kwargs = {"resolution": resolution, "tokenizer": comps.tokenizer, "caption_column": caption_column}
        target = ImageFolderDataset(target_data, role="target", **data_kwargs)
        innocent = ImageFolderDataset(innocent_data, role="innocent", **data_kwargs)
        if target.image_size != innocent.image_size:
            raise DatasetError(f"target images are {target.image_size} but innocent images are "
                               f"{innocent.image_size}; pass --resolution")
        unet = comps.unet
        comps.to(device)
        loss_fn = comps.loss_fn()
        if resume:
            return MaskLearner.load(str(resume), unet, loss_fn, backend=backend), unet, target, innocent
        pre_state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        ft_state = load_tensors(ft_dir, "--finetuned")  # safetensors only, read lazily
        scores = {} if ranking is None else {"init": reference_masks.RANKINGS[ranking](unet, pre_state, ft_state)}
        return MaskLearner(unet, pre_state, ft_state, loss_fn, config, backend=backend, **scores), unet, target, innocent
    except (KeyError, TypeError, DatasetError, PipelineError, WeightsError) as exc:
        raise LearnInputError(str(exc).strip("'\"")) from None


def _continue_resumed(learner: MaskLearner, config: LearnerConfig, overrides: dict[str, Any],
                      on_warning: Callable[[str], None] | None) -> None:
    """A restored learner takes this run's overridable settings (a warning each); any other difference is refused."""
    if learner.freeze_ratio != config.freeze_ratio:
        raise LearnInputError(f"--resume state was learned with ratio {learner.freeze_ratio}, not --freeze-ratio "
                              f"{config.freeze_ratio}")
    if overrides:
        old = {key: getattr(learner.config, key) for key in overrides}
        try:
            learner.retune(**overrides)
        except ValueError as exc:
            raise LearnInputError(f"--override-hparams: {exc}") from None
        if on_warning is not None:
            for key, value in overrides.items():
                on_warning(f"--override-hparams: {_flag(key)} {old[key]} from the state is replaced by {value}")
    diff = learner.config.differences(config)
    if diff:
        raise LearnInputError("--resume state was learned with other settings (" + "; ".join(
            f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items()) + ")")


def _fit_logged(learner: MaskLearner, batches: Iterator[dict], steps: int, *, seed: int, device: torch.device,
                log_path: Path, resumed: bool, state: str | Path | None, checkpoint_every: int, progress: bool,
                on_warning: Callable[[str], None] | None) -> tuple[int, float]:
    """Run the learner up to ``steps`` in all, a JSONL log line per step and a state every
    ``checkpoint_every`` steps; its warnings go to ``on_warning`` once, after the run.
    Returns (steps run now, seconds)."""
    done = learner.step_count
    remaining = max(0, steps - done)

    def with_generator(stream):
        # Per-step generators make noise and timesteps a function of (seed, step): a resumed run
        # continues exactly as an uninterrupted one.
        step = 0
        for batch in stream:
            if step >= done:
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
                yield dict(batch, generator=gen)
            step += 1

    if resumed:  # steps after the checkpoint run again: their old lines go
        _keep_log_until(log_path, done)
    else:
        files.write_text(log_path, "")
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log_file:
        def on_step(entry: dict) -> None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
            if checkpoint_every and learner.step_count % checkpoint_every == 0:
                learner.save(str(state))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learner.fit(with_generator(batches), remaining, progress=progress, callback=on_step)
    for w in caught:
        if on_warning is not None:
            on_warning(str(w.message))
    return remaining, time.perf_counter() - started


def _write_plot(learner: MaskLearner, mask: FreezeMask, plot_path: Path, config: LearnerConfig,
                on_warning: Callable[[str], None] | None) -> bool:
    """The soft-mask PNG; optional and never fatal (the mask is already written). True when written."""
    try:
        from freezeguard.apps.learn.plot import plot_soft_mask

        plot_soft_mask(learner.soft_mask(), plot_path, frozen=mask.frozen_names,
                       title=f"soft mask after {learner.step_count} steps (target ratio "
                             f"{config.freeze_ratio} by {config.budget_by})")
        return True
    except Exception as exc:
        if on_warning is not None:
            on_warning(f"the soft-mask PNG was not written: {exc}")
        return False


def learn(pretrained: str | Path, finetuned: str | Path, target_data: str | Path, innocent_data: str | Path,
          out: str | Path, config: LearnerConfig, *, ranking: str | None = None, steps: int = 100,
          batch_size: int = 4, hard_mask: str = "topk", resolution: int | None = None, caption_column: str = "text",
          state: str | Path | None = None, checkpoint_every: int = 0, resume: str | Path | None = None,
          plot: str | Path | None = None, log: str | Path | None = None, backend: str = "auto",
          device: str | torch.device | None = None, progress: bool = True,
          on_warning: Callable[[str], None] | None = None, override_hparams: bool = False) -> dict[str, Any]:
    """Learn a mask for the UNet of a local SD folder and write it; returns a JSON-ready summary.

    ``config`` holds every learner setting (its ``seed`` also orders the batches and draws the
    noise). ``ranking`` names the reference ranking (``reference_masks.RANKINGS``: "delta",
    "cross-attention") the logits start from; it goes with ``config.init == "scores"``.
    The mask is written first (atomically); the plot is optional and comes last, so a missing
    plotting library never costs the learned mask. ``on_warning`` receives the learner's
    warnings (e.g. "the data never moved the mask") once, after the run, and a missing plotting
    library up front. A resumed run (``resume``) must use the hyperparameters of its state file;
    ``override_hparams=True`` continues with the new values of the overridable ones (a warning
    each). Outputs (out, state, log, plot) must be distinct files.
    """
    # 1. Every input and output checked, from the files' headers and the state's metadata alone.
    pre_root, ft_dir, out = check_learn_inputs(
        pretrained, finetuned, target_data, innocent_data, out, steps=steps, batch_size=batch_size,
        hard_mask=hard_mask, state=state, checkpoint_every=checkpoint_every, resume=resume)
    _check_ranking(ranking, config)
    log_path, plot_path = check_outputs(out, state=state, log=log, plot=plot, resume=resume,
                                        inputs={"--pretrained": pretrained, "--finetuned": finetuned,
                                                "--target-data": target_data, "--innocent-data": innocent_data})
    if override_hparams and not resume:
        raise LearnInputError("--override-hparams needs --resume")
    # every LearnerConfig field, from the state file's metadata, before any model loads
    overrides = check_resume(resume, config.to_json(), override_hparams=override_hparams) if resume else {}
    # The plot is optional: a missing matplotlib is said now, not after the learning.
    plot_skipped = not plots_available()
    if plot_skipped and on_warning is not None:
        on_warning("matplotlib is not installed, so no soft-mask PNG will be written (pip install matplotlib); "
                   "the mask, log and summary are unaffected")

    # 2. The model, the data and the learner.
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    learner, unet, target, innocent = _load_learner(
        pre_root, ft_dir, target_data, innocent_data, config, ranking=ranking, resume=resume,
        resolution=resolution, caption_column=caption_column, backend=backend, device=device)
    if resume:
        _continue_resumed(learner, config, overrides, on_warning)

    # 3. The learning, logged (and checkpointed) step by step.
    unet.train()
    remaining, seconds = _fit_logged(
        learner, mixed_batches(target, innocent, batch_size, seed=config.seed), steps, seed=config.seed,
        device=device, log_path=log_path, resumed=bool(resume), state=state, checkpoint_every=checkpoint_every,
        progress=progress, on_warning=on_warning)

    # 4. The results: the state, the mask (atomically, first), then the optional plot.
    if state:
        learner.save(str(state))
    mask = learner.hard_mask(hard_mask)
    unet.to("cpu")
    # the learner moved the live weights: the content hash binds the mask to the release as stored
    mask.save(str(out), model=unet, released=load_tensors(_unet_dir(pre_root, "--pretrained"), "--pretrained"))
    if not plot_skipped:
        plot_skipped = not _write_plot(learner, mask, plot_path, config, on_warning)
    return _summary(learner, mask, config, hard_mask=hard_mask, ranking=ranking, out=out, log_path=log_path,
                    plot_path=None if plot_skipped else plot_path, state=state, steps_this_run=remaining,
                    seconds=seconds, device=device)


def _summary(learner: MaskLearner, mask: FreezeMask, config: LearnerConfig, *, hard_mask: str,
             ranking: str | None, out: Path, log_path: Path, plot_path: Path | None, state: str | Path | None,
             steps_this_run: int, seconds: float, device: torch.device) -> dict[str, Any]:
    """What :func:`learn` returns (and ``freezeguard learn --json`` prints)."""
    last = learner.history[-1] if learner.history else {}
    return {
        "out": str(out), "plot": None if plot_path is None else str(plot_path), "log": str(log_path),
        "state": None if state is None else str(state),
        "steps": learner.step_count, "steps_this_run": steps_this_run, "seconds": round(seconds, 3),
        "device": str(device), "budget_by": config.budget_by, "target_ratio": config.freeze_ratio,
        "realised_ratio": mask.ratio(config.budget_by), "ratio_tensors": mask.ratio("tensors"),
        "ratio_params": mask.ratio("params"), "frozen_tensors": len(mask.frozen_names),
        "tensors": len(mask.names), "hard_mask": hard_mask,
        "final_target_loss": last.get("target_loss"), "final_innocent_loss": last.get("innocent_loss"),
        "soft_ratio": last.get("soft_ratio"),
        # tensors the data moved in or out of the mask, against the initial logits' mask
        "mask_moved": last.get("mask_moved"), "frozen_moved": last.get("frozen_moved"),
        "frozen_moved_share": last.get("frozen_moved_share"), "live": last.get("live"),
        "init": ranking or config.init, "budget": config.budget, "c_sparsity": learner.c_sparsity,
    }


__all__ = ["learn", "check_learn_inputs", "check_resume", "check_outputs", "LearnInputError", "OVERRIDABLE", "FIXED"]
