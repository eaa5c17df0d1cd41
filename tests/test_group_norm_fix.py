"""torch 2.13.0's CPU GroupNorm backward crashes on a channels-last input that needs no gradient;
freezeguard's training loops hand such inputs over contiguous (freezeguard.core.group_norm_fix)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from freezeguard.core.group_norm_fix import protect_group_norms

CRASH = """
import itertools, torch
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 1, 1))
x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)   # as after frozen layers: no grad
loss_fn = lambda m, b: m(b["x"]).flatten(1).mean(1)
{run}
print("survived")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_training_loop_survives_what_crashes_plain_torch():
    run = ("from freezeguard.core.training import train_steps\n"
           "train_steps(model, torch.optim.AdamW(model.parameters()), itertools.repeat({'x': x}), loss_fn, 2)")
    proc = _run(CRASH.format(run=run))
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]
    # the same without the fix: on torch 2.13.0+cpu it dies (SIGSEGV); a fixed torch just passes
    plain = _run(CRASH.format(run="loss_fn(model, {'x': x}).mean().backward()"))
    assert plain.returncode in (0, -11), plain.stderr[-2000:]


def test_the_fix_changes_no_value_or_gradient():
    torch.manual_seed(0)
    a, b = torch.nn.GroupNorm(2, 8), torch.nn.GroupNorm(2, 8)
    b.load_state_dict(a.state_dict())
    assert protect_group_norms(b) == 1 and protect_group_norms(b) == 0   # once per module
    x = torch.randn(2, 8, 4, 4)
    out_a = a(x)                                                    # contiguous: the sound kernel
    out_b = b(x.to(memory_format=torch.channels_last))             # handed over contiguous
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    torch.testing.assert_close(b.weight.grad, a.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(b.bias.grad, a.bias.grad, rtol=0, atol=0)
