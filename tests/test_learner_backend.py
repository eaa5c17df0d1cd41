"""A learner built with a forced backend runs every fused op on that backend.

Every ``fg.ops`` entry resolves its backend through ``freezeguard.ops.entries.resolve``; the
spy records what each call asked for. Before the fix, the AdamW user step called its op
without ``backend=``, so a forced backend was silently replaced by "auto" there.
"""
from __future__ import annotations

import pytest
import torch

import freezeguard as fg
from freezeguard.backends import status
from freezeguard.ops import entries


def _learner(backend: str, user_optimizer: str) -> fg.MaskLearner:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {k: v + 0.1 * torch.randn_like(v) for k, v in pre.items()}

    def loss_fn(m, batch):
        return (m(batch["x"]).squeeze(1) - batch["y"]) ** 2

    return fg.MaskLearner(model, pre, ft, loss_fn, user_interval=2, user_lr=1e-2, backend=backend,
                          user_optimizer=user_optimizer)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("user_optimizer", ["sgd", "adamw"])
def test_every_fused_op_call_honours_the_forced_backend(monkeypatch, backend, user_optimizer):
    if not status(backend).available:
        pytest.skip(status(backend).reason)
    asked: list[tuple[str, str]] = []
    real = entries.resolve

    def spy(name, device, *, op=None, tensors=None):
        asked.append((op, name))
        return real(name, device, op=op, tensors=tensors)

    monkeypatch.setattr(entries, "resolve", spy)
    learner = _learner(backend, user_optimizer)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # releaser and user steps alternate (user_interval=2)
        learner.step({"x": torch.randn(4, 6, generator=gen), "y": torch.randn(4, generator=gen),
                      "is_target": torch.tensor([True, False, True, False])})
    ops_called = {op for op, _ in asked}
    user_op = "user_update_" if user_optimizer == "sgd" else "user_adamw_"
    assert {"mask_shift_", "segment_dot", user_op} <= ops_called, ops_called
    assert all(name == backend for _, name in asked), [c for c in asked if c[1] != backend]
