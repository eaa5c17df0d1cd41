"""Unlearnable examples for diffusion models: UDP / EUDP (Zhao et al., arXiv 2306.01902). Data-side.

The data owner adds to each image x_n a perturbation δ_n with ‖δ_n‖∞ ≤ ε so that a diffusion
model fine-tuned on {x_n + δ_n} learns little about the real images. The paper frames it as a
max-min problem and solves it, like unlearnable examples for classifiers (Huang et al., ICLR
2021), with *error-minimising* noise: alternate

- M steps training a surrogate diffusion model on the perturbed images (plain diffusion loss), and
- for every mini-batch, K projected sign-gradient steps that *lower* the surrogate's denoising
  loss on x + δ (so the images carry a shortcut the model fits instead of the content),
  projected to ‖δ‖∞ ≤ ε and to the valid pixel range.

EUDP changes which timesteps the perturbation is optimised at: δ reaches the noised input as
√ᾱ_t·δ, so at large t it is drowned by the noise; EUDP samples t by the noise scheduler instead
of uniformly. The paper has no public code. Our reading, flagged as such: δ-steps draw t with
probability ∝ √ᾱ_t (the share of x_t the perturbation survives in); ``timestep_weighting=
"uniform"`` is plain UDP.

Defaults and their source: ε = 8/255 of the [0, 1] range (the paper's and Huang et al.'s budget),
i.e. 16/255 for images in [-1, 1] as diffusers models take them; step size ε/10 (Huang et al.:
0.8/255 for 8/255), K = 20 steps per mini-batch and M = 10 surrogate steps per round (Huang et
al.'s sample-wise setting); the surrogate trains with AdamW at ``reference_lr`` (the attacker's
lr on this model). ``rounds`` replaces Huang et al.'s stop-at-99%-accuracy rule, which has no
analogue for a denoising loss. The gradient must reach the pixels: pixel-space models, or pass
"latents" and perturb those (a VAE encoder under no_grad blocks the gradient; that raises).

Example:
    >>> from freezeguard.integrations.diffusers import toy
    >>> from freezeguard.apps.baselines import udp
    >>> model = toy.build_model()
    >>> data = toy.make_batch(["frame"], 8, seed=0)
    >>> res = udp(model, toy.make_loss_fn(), data, rounds=1, surrogate_steps=1, pgd_steps=1,
    ...           noise_scheduler=toy.build_scheduler(), reference_lr=1e-3)
    >>> bool((res.delta.abs() <= res.epsilon + 1e-7).all())
    True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from freezeguard.apps.baselines._common import LossFn, check_loss_fn, check_module, per_sample_losses
from freezeguard.core.training import train_steps
from freezeguard.core.values import check_positive

WEIGHTINGS = ("eudp", "uniform")
#: 8/255 of the [0, 1] range, expressed for images in [-1, 1].
DEFAULT_EPSILON = 16 / 255


@dataclass
class UDPResult:
    """The protected data (a copy of the input dict with perturbed images), δ, and a log.

    Example:
        >>> res = udp(unet, loss_fn, data, noise_scheduler=sched)    # doctest: +SKIP
        >>> bool(res.delta.abs().max() <= res.epsilon)                # doctest: +SKIP
        True
    """

    data: dict[str, Any]
    delta: torch.Tensor
    epsilon: float
    key: str
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def _timestep_probs(noise_scheduler: Any, weighting: str) -> torch.Tensor:
    n = int(noise_scheduler.config.num_train_timesteps)
    if weighting == "uniform":
        return torch.full((n,), 1.0 / n)
    w = noise_scheduler.alphas_cumprod.detach().double().cpu().sqrt()
    return (w / w.sum()).float()


def finite_stream(data: Mapping[str, Any], batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Endless shuffled epochs over a fixed set of samples (how an attacker trains on protected data).

    Example:
        >>> s = finite_stream({"x": torch.arange(4)}, 2, seed=0)
        >>> sorted(torch.cat([next(s)["x"], next(s)["x"]]).tolist())
        [0, 1, 2, 3]
    """
    n = _num_samples(data)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[start:start + batch_size]
            yield {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v)
                   for k, v in data.items()}


def _num_samples(data: Mapping[str, Any]) -> int:
    sizes = {v.shape[0] for v in data.values() if isinstance(v, torch.Tensor) and v.ndim}
    if len(sizes) != 1:
        raise ValueError(f"udp: data must hold per-sample tensors of one length N, got first dims {sorted(sizes)}")
    return sizes.pop()


def udp(model: nn.Module, loss_fn: LossFn, data: Mapping[str, Any], *, epsilon: float = DEFAULT_EPSILON,
        step_size: float | None = None, rounds: int = 5, surrogate_steps: int = 10, pgd_steps: int = 20,
        batch_size: int = 16, reference_lr: float = 1e-5, timestep_weighting: str = "eudp",
        noise_scheduler: Any = None, key: str = "pixel_values", clamp: tuple[float, float] | None = (-1.0, 1.0),
        seed: int = 0) -> UDPResult:
    """Perturb ``data[key]`` (N images) with error-minimising noise bounded by ``epsilon`` in L∞.

    ``data``: one dict of N samples as ``loss_fn`` takes them (e.g. "pixel_values" [N,C,H,W],
    "encoder_hidden_states" [N,L,D]); ``model``: the surrogate's starting point (the public
    released model). ``noise_scheduler`` (its ``alphas_cumprod`` and ``num_train_timesteps``) is
    needed for the timesteps. Returns the protected copy of ``data``; the model is not changed.

    Example:
        >>> res = udp(unet, loss_fn, {"pixel_values": x, "encoder_hidden_states": c},
        ...           noise_scheduler=sched, reference_lr=1e-3)       # doctest: +SKIP
        >>> protected = res.data                                        # doctest: +SKIP
    """
    who = "udp"
    check_module(model, who)
    check_loss_fn(loss_fn, who)
    if not isinstance(data, Mapping):
        raise TypeError(f"{who}: data must be a dict of per-sample tensors, got {type(data).__name__}")
    if key not in data or not isinstance(data[key], torch.Tensor) or not data[key].is_floating_point():
        raise ValueError(f"{who}: data[{key!r}] must be a float tensor of images [N, C, H, W]")
    if timestep_weighting not in WEIGHTINGS:
        raise ValueError(f"{who}: timestep_weighting must be one of {WEIGHTINGS}, got {timestep_weighting!r}")
    if noise_scheduler is None or not hasattr(noise_scheduler, "alphas_cumprod"):
        raise ValueError(f"{who}: noise_scheduler (a DDPM-type scheduler with alphas_cumprod) is required "
                         "to draw the timesteps")
    check_positive(epsilon, "epsilon", who)
    step_size = epsilon / 10 if step_size is None else step_size
    check_positive(step_size, "step_size", who)
    for value, name in ((rounds, "rounds"), (surrogate_steps, "surrogate_steps"), (pgd_steps, "pgd_steps"),
                        (batch_size, "batch_size")):
        check_positive(value, name, who, integer=True)
    check_positive(reference_lr, "reference_lr", who)
    n = _num_samples(data)
    images = data[key].detach()
    device = next(model.parameters()).device
    probs = _timestep_probs(noise_scheduler, timestep_weighting)
    gen = torch.Generator().manual_seed(seed)
    surrogate = copy.deepcopy(model).to(device)
    opt = torch.optim.AdamW(surrogate.parameters(), lr=reference_lr)
    delta = torch.zeros_like(images)
    lo, hi = clamp if clamp is not None else (-float("inf"), float("inf"))
    result = UDPResult({}, delta, float(epsilon), key, config={
        "epsilon": epsilon, "step_size": step_size, "rounds": rounds, "surrogate_steps": surrogate_steps,
        "pgd_steps": pgd_steps, "batch_size": batch_size, "reference_lr": reference_lr,
        "timestep_weighting": timestep_weighting, "n_images": n})

    def sub(idx: torch.Tensor, x: torch.Tensor) -> dict[str, Any]:
        out = {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v)
               for k, v in data.items()}
        out[key] = x
        return out

    for rnd in range(rounds):
        # 1. the surrogate learns the perturbed data (uniform timesteps: ordinary training)
        def perturbed() -> Iterator[dict[str, Any]]:
            while True:
                idx = torch.randperm(n, generator=gen)[:batch_size]
                yield sub(idx, (images[idx] + delta[idx]).to(device))

        train_steps(surrogate, opt, perturbed(), loss_fn, surrogate_steps, generator=gen)
        # 2. error-minimising steps on δ for every mini-batch, the surrogate fixed
        surrogate.requires_grad_(False)
        total = 0.0
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x0 = images[idx]
            d = delta[idx].clone()
            for _ in range(pgd_steps):
                d.requires_grad_(True)
                t = torch.multinomial(probs, len(idx), replacement=True, generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                batch = sub(idx, (x0 + d).to(device))
                batch.update(noise=noise, timesteps=t)
                loss = per_sample_losses(loss_fn, surrogate, batch, who).mean()
                grad = torch.autograd.grad(loss, d, allow_unused=True)[0] if loss.requires_grad else None
                if grad is None:
                    raise ValueError(f"{who}: the loss does not depend on data[{key!r}] differentiably (a VAE "
                                     "encoded under no_grad?); perturb latents: pass them as data['latents'], "
                                     "key='latents', clamp=None")
                with torch.no_grad():
                    d = d.detach() - step_size * grad.sign()
                    d = d.clamp(-epsilon, epsilon)
                    # keep x + δ a valid image
                    d = (x0 + d).clamp(lo, hi) - x0
                total += float(loss.detach()) * len(idx)
            delta[idx] = d.detach()
        surrogate.requires_grad_(True)
        result.history.append({"round": rnd, "delta_loss": total / (n * pgd_steps),
                               "linf": float(delta.abs().max())})
    result.data = dict(data)
    result.data[key] = (images + delta).detach()
    result.delta = delta
    return result
