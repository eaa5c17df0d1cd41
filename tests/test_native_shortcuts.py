"""The native bookkeeping shortcuts (freezeguard/ops/native_shortcuts.py) agree with the Python rules.

The shortcuts only decide "valid" fast; everything they refuse must be something the Python
checks in freezeguard.ops.validation reject (they write the error), and the ops, the optimizer and their
errors must be the same with and without the native extension.
"""
from __future__ import annotations

import pytest
import torch

import freezeguard as fg
from freezeguard.ops import native_shortcuts as _shortcuts
from freezeguard.ops import validation

NATIVE = _shortcuts._native() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="the C++ extension freezeguard._C is not installed prebuilt")


@pytest.fixture
def python_only(monkeypatch):
    """Run as on an install without the C++ extension."""
    monkeypatch.setattr(_shortcuts, "_native", lambda: None)


def _z(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


VALID = {
    "empty lists": ([], []),
    "one pair": ([_z(3)], [_z(3)]),
    "mixed sizes and dtypes across positions": ([_z(3), _z(2, 2, dtype=torch.bfloat16), _z(0, dtype=torch.float16)],
                                                [_z(3), _z(2, 2, dtype=torch.bfloat16), _z(0, dtype=torch.float16)]),
    "three lists": ([_z(5)], [_z(5)], [_z(5)]),
    "non-contiguous": ([_z(4, 4).t()], [_z(4, 4)]),
}

INVALID = {
    "lengths differ": ([_z(3), _z(3)], [_z(3)]),
    "shape differs": ([_z(3)], [_z(4)]),
    "same numel, other shape": ([_z(2, 3)], [_z(3, 2)]),
    "dtype differs between lists": ([_z(3)], [_z(3, dtype=torch.bfloat16)]),
    "float64": ([_z(3, dtype=torch.float64)], [_z(3, dtype=torch.float64)]),
    "int64": ([_z(3, dtype=torch.int64)], [_z(3, dtype=torch.int64)]),
    "sparse": ([_z(3, 3).to_sparse()], [_z(3, 3).to_sparse()]),
    "two devices": ([_z(3)], [_z(3, device="meta")]),
    "two devices across positions": ([_z(3), _z(3, device="meta")], [_z(3), _z(3, device="meta")]),
    "not a tensor": ([[0.0, 0.0]], [_z(2)]),
    "None": ([None], [_z(2)]),
}


def _python_rules(lists):
    kw = {f"l{i}": ts for i, ts in enumerate(lists)}
    validation.check_lists("test", kw)
    validation.check_same_dtype("test", kw)


@needs_native
@pytest.mark.parametrize("case", list(VALID))
def test_native_check_accepts_what_python_accepts(case):
    lists = VALID[case]
    _python_rules(lists)
    ok, contiguous = _shortcuts.fast_check(lists)
    assert ok
    assert contiguous == all(t.is_contiguous() for ts in lists for t in ts)


@needs_native
@pytest.mark.parametrize("case", list(INVALID))
def test_native_check_refuses_what_python_rejects(case):
    lists = INVALID[case]
    with pytest.raises((TypeError, ValueError)):
        _python_rules(lists)
    assert _shortcuts.fast_check(lists) == (False, False)


def _error_of(fn):
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    raise AssertionError("no error raised")


@needs_native
@pytest.mark.parametrize("case", list(INVALID))
def test_ops_raise_the_same_error_with_and_without_native(case, monkeypatch):
    a, b = INVALID[case]
    with_native = _error_of(lambda: fg.ops.segment_dot(a, b, backend="torch"))
    monkeypatch.setattr(_shortcuts, "_native", lambda: None)
    assert _error_of(lambda: fg.ops.segment_dot(a, b, backend="torch")) == with_native


def _random_lists(seed, k, sizes=(7, 1, 300, 4099)):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in sizes] for _ in range(k)]


def _run_all_ops(lists):
    theta, delta, grad, m, v = lists
    dot = fg.ops.segment_dot(theta, delta, backend="torch")
    fg.ops.mask_shift_(theta, delta, [0.25, 0.5, 0.75, 1.0], backend="torch")
    fg.ops.user_update_(theta, delta, grad, [0.0, 0.5, 1.0, 0.2], 0.1, backend="torch")
    v = [x.abs() for x in v]
    fg.ops.masked_adamw_(theta, grad, m, v, [1, 2, 3, 4], lr=1e-2, backend="torch")
    return [dot, *theta, *delta, *m, *v]


def test_ops_give_identical_results_without_native(monkeypatch):
    with_native = _run_all_ops(_random_lists(0, 5))
    monkeypatch.setattr(_shortcuts, "_native", lambda: None)
    python_only = _run_all_ops(_random_lists(0, 5))
    assert all(torch.equal(a, b) for a, b in zip(with_native, python_only, strict=True))


def test_non_contiguous_outputs_are_still_written_back():
    base = torch.zeros(4, 4)
    theta = [base.t()]  # a strided view: the op must write through it
    fg.ops.mask_shift_(theta, [torch.ones(4, 4)], [2.0], backend="torch")
    assert torch.equal(base, torch.full((4, 4), 2.0))


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_step_counters_read_and_bump(native, monkeypatch):
    if native and not NATIVE:
        pytest.skip("the C++ extension is not installed prebuilt")
    if not native:
        monkeypatch.setattr(_shortcuts, "_native", lambda: None)
    counters = [torch.tensor(float(i), dtype=torch.float32) for i in range(5)]
    versions = [c._version for c in counters]
    assert _shortcuts.read_steps(counters) == [0.0, 1.0, 2.0, 3.0, 4.0]
    _shortcuts.add_to_steps_(counters, 1.0)
    assert [c.item() for c in counters] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(c._version > v for c, v in zip(counters, versions, strict=True))  # seen as an in-place write


def test_step_counters_of_another_kind_fall_back_and_nothing_is_half_applied():
    # One float64 counter among float32 ones: the native call refuses before writing anything,
    # and the fallback bumps every counter exactly once.
    counters = [torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64), torch.tensor(3.0)]
    assert _shortcuts.read_steps(counters) == [1.0, 2.0, 3.0]
    _shortcuts.add_to_steps_(counters, 1.0)
    assert [c.item() for c in counters] == [2.0, 3.0, 4.0]


def _train(seed: int, steps: int = 4):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    mask = fg.FreezeMask.from_names(model, ["0.bias"])
    opt = fg.optim.AdamW(model.named_parameters(), lr=1e-2, mask=mask, backend="torch")
    for _ in range(steps):
        model(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_optimizer_is_identical_without_native(monkeypatch):
    model_a, opt_a = _train(0)
    monkeypatch.setattr(_shortcuts, "_native", lambda: None)
    model_b, opt_b = _train(0)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b), name
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert opt_a.state[model_a[2].weight]["step"].item() == 4.0


def test_looking_for_the_native_module_never_compiles(monkeypatch):
    from freezeguard.backends import _build

    def no_build(kind):
        raise AssertionError("loaded_or_prebuilt must not start a JIT build")

    monkeypatch.setattr(_build, "_jit_build", no_build)
    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setattr(_build, "_no_prebuilt", set())
    monkeypatch.setattr(_build, "_prebuilt_present", lambda kind: False)
    assert _build.loaded_or_prebuilt("cpu") is None
    assert "cpu" in _build._no_prebuilt  # asked on every op: the miss is remembered, not searched again
    monkeypatch.setattr(_build, "_no_prebuilt", set())  # forget the miss: look again below

    def broken_import(name):
        raise ImportError("built against another torch")

    monkeypatch.setattr(_build, "_prebuilt_present", lambda kind: True)
    monkeypatch.setattr(_build, "_import_prebuilt", broken_import)
    assert _build.loaded_or_prebuilt("cpu") is None
