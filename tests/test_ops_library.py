"""The fused ops as torch.library custom ops: schemas, fake implementations, torch.compile.

``torch.compile(fullgraph=True)`` over functions calling ``fg.ops`` must trace without a graph
break and give the eager results (aot_eager runs AOTAutograd's functionalization of the
mutating ops; one inductor case runs the full CPU code generation).
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import freezeguard as fg
from freezeguard.backends import get_backend, reference, status
from freezeguard.backends.opspecs import BETAS, BOOL, COUNTS, FLOAT, INT, PER_TENSOR, PUBLIC, TENSORS

OPS = ("masked_adamw_", "masked_adamw_step_", "segment_dot", "mask_shift_", "user_update_", "user_adamw_",
       "masked_sgd_momentum_")
MUTATES = {
    "masked_sgd_momentum_": {"params", "momentum_buffers"},
    "masked_adamw_": {"params", "exp_avgs", "exp_avg_sqs"},
    "masked_adamw_step_": {"params", "exp_avgs", "exp_avg_sqs", "step_counters"},
    "segment_dot": set(),
    "mask_shift_": {"theta"},
    "user_update_": {"theta", "delta"},
    "user_adamw_": {"theta", "delta", "grads", "exp_avgs", "exp_avg_sqs"},
}


@pytest.mark.parametrize("name", OPS)
def test_schemas_say_what_each_op_mutates(name):
    schema = getattr(torch.ops.freezeguard, name).default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == MUTATES[name]


def test_fake_implementations_check_shapes_and_dtypes():
    with FakeTensorMode():
        a, b = [torch.empty(3), torch.empty(2)], [torch.empty(3), torch.empty(2)]
        out = torch.ops.freezeguard.segment_dot(a, b, "auto")
        assert out.shape == (2,) and out.dtype == torch.float32
        with pytest.raises(RuntimeError, match="shape"):
            torch.ops.freezeguard.segment_dot(a, [torch.empty(4), torch.empty(2)], "auto")
        with pytest.raises(RuntimeError, match="bfloat16"):
            torch.ops.freezeguard.mask_shift_(a, [torch.empty(3, dtype=torch.bfloat16), torch.empty(2)],
                                              torch.empty(2), "auto")
        with pytest.raises(RuntimeError, match="one value per tensor"):
            torch.ops.freezeguard.user_update_(a, b, b, torch.empty(3), 0.1, "auto")


def _lists(seed, sizes=(5, 3, 130)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for n in sizes]


def _train_step(p, g, m, v, counters, theta, delta):
    fg.ops.masked_adamw_step_(p, g, m, v, counters, lr=1e-2)
    s = fg.ops.segment_dot(delta, g)
    fg.ops.mask_shift_(theta, delta, torch.sigmoid(s))
    fg.ops.user_update_(theta, delta, g, torch.sigmoid(-s), 0.05)
    return s * 2


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_step_has_no_graph_break_and_matches_eager(compiler):
    def state(seed):
        p, g, m, theta, delta = (_lists(seed + k) for k in range(5))
        v = [x.abs() for x in _lists(seed + 9)]
        return p, g, m, v, [torch.tensor(float(k)) for k in range(3)], theta, delta

    eager = state(0)
    out_eager = _train_step(*eager)
    compiled = state(0)
    torch._dynamo.reset()
    fn = torch.compile(_train_step, fullgraph=True, backend=compiler)  # fullgraph: any break raises
    out = fn(*compiled)
    torch.testing.assert_close(out, out_eager)
    for got, want in zip(compiled, eager, strict=True):
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y)
    assert [c.item() for c in compiled[4]] == [1.0, 2.0, 3.0]
    explain = torch._dynamo.explain(_train_step)(*state(0))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_compiled_user_adamw_matches_the_reference():
    theta, delta, g, mu = _lists(1), _lists(2), _lists(3), _lists(4)
    nu = [x.abs() for x in _lists(5)]
    ref = [[x.clone() for x in xs] for xs in (theta, delta, g, mu, nu)]
    m = torch.tensor([0.0, 0.5, 0.9])
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: fg.ops.user_adamw_(*a, m, 2, lr=1e-2, weight_decay=1e-2), fullgraph=True,
                       backend="aot_eager")
    fn(theta, delta, g, mu, nu)
    reference.user_adamw_(*ref, m, 2, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    for got, want in ((theta, ref[0]), (delta, ref[1]), (mu, ref[3]), (nu, ref[4])):
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y)


def test_compiled_optimizer_step_fullgraph_matches_eager():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = fg.optim.AdamW(model.named_parameters(), lr=1e-2, mask=fg.FreezeMask.from_names(model, ["0.bias"]))
        return model, opt

    def grads(model, s):
        gen = torch.Generator().manual_seed(s)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)  # fresh tensors every step

    a, opt_a = make()
    b, opt_b = make()
    frozen = b[0].bias.detach().clone()
    torch._dynamo.reset()
    step = torch.compile(opt_b.step, fullgraph=True, backend="aot_eager")
    for s in range(4):
        grads(a, s)
        grads(b, s)
        opt_a.step()
        step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p)
    assert torch.equal(b[0].bias, frozen) and b[0].bias not in opt_b.state
    assert float(opt_b.state[b[1].weight]["step"]) == 4.0


# ---- torch.library.opcheck: every op, every backend that runs on the CPU here

def _cpu_backends() -> list[str]:
    return [b for b in ("torch", "cpp", "triton")
            if status(b).available and get_backend(b).supports(torch.device("cpu"))[0]]


def _example_args(spec, device="cpu", sizes=(3, 5, 2)) -> list:
    """Small valid inputs for ``spec``, in its torch.library schema's order (backend excluded)."""
    gen = torch.Generator().manual_seed(0)
    args: list = []
    for a in spec.args:
        if a.kind == TENSORS:
            args.append([(torch.randn(n, generator=gen).abs() + 0.1).to(device) for n in sizes])
        elif a.kind == PER_TENSOR:
            args.append(torch.rand(len(sizes), generator=gen).to(device))
        elif a.kind == COUNTS:
            args.append([float(k + 1) for k in range(len(sizes))])
        elif a.kind == BETAS:
            args += [0.9, 0.999]
        elif a.kind == INT:
            args.append(int(a.minimum or 0) + 1)
        elif a.kind == BOOL:
            args.append(False)
        else:
            assert a.kind == FLOAT
            args.append(a.default if isinstance(a.default, float) else 1e-2)
    return args


def _opcheck_cases():
    on_cpu = [(b, "cpu", ()) for b in _cpu_backends()]
    on_gpu = [(b, "cuda", (pytest.mark.gpu,)) for b in ("cuda", "triton")]  # the GPU session runs these
    for backend, device, marks in on_cpu + on_gpu:
        for spec in PUBLIC:
            if get_backend(backend).implements(spec.name):
                yield pytest.param(spec, backend, device, id=f"{spec.name}-{backend}-{device}", marks=marks)
        yield pytest.param(None, backend, device, id=f"masked_adamw_step_-{backend}-{device}", marks=marks)


@pytest.mark.parametrize("spec,backend,device", list(_opcheck_cases()))
def test_opcheck(spec, backend, device):
    """Schema (what is mutated), fake tensors and AOT dispatch of each op agree with its eager run."""
    if device == "cuda" and not status(backend).available:
        pytest.skip(status(backend).reason)
    if spec is None:
        lists = [[x.to(device) for x in _lists(k)] for k in (1, 2, 3)]
        args = (*lists, [x.abs().to(device) for x in _lists(4)], [torch.tensor(float(k)) for k in range(3)],
                1e-2, None, 0.9, 0.999, 1e-8, 1e-2, backend)
        op = torch.ops.freezeguard.masked_adamw_step_.default
    else:
        args = (*_example_args(spec, device), backend)
        op = getattr(torch.ops.freezeguard, spec.name).default
    torch.library.opcheck(op, args)
