"""fg.optim.AdamW(capturable=True): step counts and lr read where the math runs.

On the CPU the device-side path runs (counters as tensors, lr a tensor, no host reads) and must
match torch.optim.AdamW and the reference; on a GPU the whole step is captured in a CUDA graph
and replayed (marked gpu).
"""
from __future__ import annotations

import copy

import pytest
import torch

import freezeguard as fg
from freezeguard.backends import get_backend, status

CPU_BACKENDS = [b for b in ("torch", "cpp", "triton")
                if status(b).available and get_backend(b).supports(torch.device("cpu"))[0]]


def _model(device="cpu", seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device)


def _grads(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr_kind", ["tensor", "float"])
def test_capturable_matches_torch_adamw_on_cpu(backend, lr_kind):
    a, b = _model(), _model()
    mask = fg.FreezeMask.from_names(a, ["2.bias"])
    lr = torch.tensor(1e-2) if lr_kind == "tensor" else 1e-2
    ours = fg.optim.AdamW(a.named_parameters(), lr=lr, mask=mask, capturable=True, backend=backend)
    ref = torch.optim.AdamW([p for n, p in b.named_parameters() if n != "2.bias"], lr=1e-2, foreach=False)
    frozen_before = a[2].bias.detach().clone()
    for s in range(4):
        if lr_kind == "tensor" and s == 2:  # changed in place, as a captured graph would see it
            ours.param_groups[0]["lr"].fill_(5e-3)
            ref.param_groups[0]["lr"] = 5e-3
        _grads(a, s)
        _grads(b, s)
        ours.step()
        ref.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if n != "2.bias":
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(a[2].bias, frozen_before) and a[2].bias not in ours.state
    st = ours.state[a[0].weight]
    assert st["step"].dtype == torch.float32 and float(st["step"]) == 4.0


def test_capturable_state_dict_round_trip():
    a = _model()
    opt = fg.optim.AdamW(a.named_parameters(), lr=torch.tensor(1e-2), capturable=True)
    _grads(a, 0)
    opt.step()
    b = _model()
    b.load_state_dict(a.state_dict())
    opt2 = fg.optim.AdamW(b.named_parameters(), lr=torch.tensor(1e-2), capturable=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares same-dtype tensors on load
    for m, o in ((a, opt), (b, opt2)):
        _grads(m, 1)
        o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
def test_capturable_step_replays_in_a_cuda_graph(backend):
    if backend != "auto" and not status(backend).available:
        pytest.skip(status(backend).reason)
    a, b = _model("cuda"), _model("cuda")
    mask = fg.FreezeMask.from_names(a, ["0.bias"])
    lr = torch.tensor(1e-2, device="cuda")
    opt = fg.optim.AdamW(a.named_parameters(), lr=lr, mask=mask, capturable=True, backend=backend)
    ref = torch.optim.AdamW([p for n, p in b.named_parameters() if n != "0.bias"], lr=1e-2, foreach=False)
    static = [torch.zeros_like(p) for p in a.parameters()]
    for p, g in zip(a.parameters(), static, strict=True):
        p.grad = g
    frozen_before = a[0].bias.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: state and device tables exist before capture
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p in b.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(2):
        ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for s in range(5):
        gen = torch.Generator(device="cuda").manual_seed(s)
        for g, q in zip(static, b.parameters(), strict=True):
            g.copy_(torch.randn(g.shape, device="cuda", generator=gen))
            q.grad = g.clone()
        if s == 3:
            lr.fill_(5e-3)
            ref.param_groups[0]["lr"] = 5e-3
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if n != "0.bias":
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(a[0].bias, frozen_before)
    assert float(opt.state[a[0].weight]["step"]) == 7.0
