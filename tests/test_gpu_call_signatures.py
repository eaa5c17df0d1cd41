"""The calls GPU-only code makes into freezeguard still fit the signatures, checked without a GPU.

Tests marked ``@pytest.mark.gpu`` (and GPU-only scripts such as ``benchmarks/gpu_cuda_sanitize.py``)
are skipped on the CPU machines CI runs on, so an API change can break them silently: two
CUDA-graph tests kept passing ``lr`` positionally to ``masked_adamw_capturable_`` after it became
keyword-only. Here every such call whose target resolves, through the module's globals, to a
freezeguard Python function is bound with ``inspect.Signature.bind`` (``bind_partial`` when a
``**kwargs`` of the call cannot be read from a ``dict(...)`` assigned in the same function).
Calls into the compiled extensions (pybind, no Python signature) are not covered.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

# GPU-only scripts: every function counts; local names their functions use for a module.
GPU_SCRIPTS = {
    "benchmarks/gpu_cuda_sanitize.py": {"be": "freezeguard.backends.cuda_backend",
                                        "ref": "freezeguard.backends.reference"},
}


@dataclass
class Call:
    where: str
    target: str
    problem: str | None


def _is_gpu_mark(node: ast.expr) -> bool:
    """``pytest.mark.gpu`` (bare or called)."""
    node = node.func if isinstance(node, ast.Call) else node
    return isinstance(node, ast.Attribute) and node.attr == "gpu" and isinstance(node.value, ast.Attribute) \
        and node.value.attr == "mark"


def _dotted(node: ast.expr) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _dict_keys(value: ast.expr) -> set[str] | None:
    """The keys of ``dict(a=..., b=...)`` or ``{"a": ...}``; None if not all known."""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict" \
            and not value.args and all(k.arg for k in value.keywords):
        return {k.arg for k in value.keywords}
    if isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                           for k in value.keys):
        return {k.value for k in value.keys}
    return None


def _locals_of(fn: ast.FunctionDef) -> tuple[set[str], dict[str, set[str] | None]]:
    """Names bound inside ``fn`` (arguments, assignments, loop and with targets), and the dicts among them."""
    bound = {a.arg for a in (*fn.args.args, *fn.args.kwonlyargs, *fn.args.posonlyargs)}
    dicts: dict[str, set[str] | None] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            dicts[node.targets[0].id] = _dict_keys(node.value)
    return bound, dicts


def _resolve(parts: list[str], namespace: dict, aliases: dict[str, str]) -> object | None:
    head, *rest = parts
    if head in aliases:
        obj: object = importlib.import_module(aliases[head])
    elif head in namespace:
        obj = namespace[head]
    else:
        return None
    for p in rest:
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj


def _bind(fn: object, call: ast.Call, dicts: dict[str, set[str] | None]) -> str | None:
    """Why this call cannot bind to ``fn``'s signature, or None when it can."""
    if any(isinstance(a, ast.Starred) for a in call.args):
        return None  # *args: the count is unknown here
    sig = inspect.signature(fn)
    args = [object()] * len(call.args)
    kwargs = {k.arg: object() for k in call.keywords if k.arg is not None}
    partial = False
    for k in call.keywords:
        if k.arg is None:  # **name
            keys = dicts.get(k.value.id) if isinstance(k.value, ast.Name) else None
            if keys is None:
                partial = True
            else:
                kwargs.update({key: object() for key in keys})
    try:
        (sig.bind_partial if partial else sig.bind)(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    return None


def check_calls(tree: ast.Module, namespace: dict, *, where: str, every_function: bool = False,
                aliases: dict[str, str] | None = None) -> list[Call]:
    """Every call into a freezeguard Python function made by the GPU-only functions of ``tree``."""
    aliases = aliases or {}
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        if not every_function and not any(_is_gpu_mark(d) for d in fn.decorator_list):
            continue
        bound, dicts = _locals_of(fn)
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            parts = _dotted(node.func)
            if parts is None or (parts[0] in bound and parts[0] not in aliases):
                continue
            target = _resolve(parts, namespace, aliases)
            if not (inspect.isfunction(target) and target.__module__.startswith("freezeguard")):
                continue
            found.append(Call(f"{where}:{node.lineno} ({fn.name})", ".".join(parts), _bind(target, node, dicts)))
    return found


def _test_module(path: Path) -> ModuleType:
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return importlib.import_module(name)


def _script_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_gpu_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_test_files() -> list[Path]:
    return sorted(p for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def _all_calls() -> list[Call]:
    calls = []
    for path in _gpu_test_files():
        try:
            module = _test_module(path)
        except pytest.skip.Exception:  # a file that skips itself here (e.g. no triton) has no calls to check
            continue
        calls += check_calls(ast.parse(path.read_text()), vars(module), where=str(path.relative_to(ROOT)))
    for rel, aliases in GPU_SCRIPTS.items():
        path = ROOT / rel
        calls += check_calls(ast.parse(path.read_text()), vars(_script_module(path)), where=rel,
                             every_function=True, aliases=aliases)
    return calls


def test_every_gpu_only_call_binds_to_its_signature():
    calls = _all_calls()
    bad = [f"{c.where}: {c.target}: {c.problem}" for c in calls if c.problem]
    assert not bad, "GPU-only code calls freezeguard with arguments its signatures refuse:\n" + "\n".join(bad)
    targets = {c.target for c in calls}
    # The walk really reaches the GPU tests (a checker that finds nothing passes vacuously).
    assert "cuda_backend.masked_adamw_capturable_" in targets, sorted(targets)
    assert "be.masked_adamw_capturable_" in targets, sorted(targets)
    assert len(calls) >= 20, len(calls)


def test_the_checker_catches_a_positional_lr():
    """The rot this file exists for: ``lr`` passed positionally to a keyword-only parameter."""
    from freezeguard.backends import cuda_backend

    src = '''
@pytest.mark.gpu
def test_x():
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    cuda_backend.masked_adamw_capturable_(p, g, m, v, steps, lr, **hp)
    cuda_backend.masked_adamw_capturable_(p, g, m, v, steps, lr=lr, **hp)
    cuda_backend.masked_adamw_capturable_(p, g, m, v, steps, lr=lr, betas=(0.9, 0.99))
'''
    calls = check_calls(ast.parse(src), {"cuda_backend": cuda_backend, "pytest": pytest}, where="snippet")
    assert [c.problem is None for c in calls] == [False, True, False], calls
    assert "positional" in calls[0].problem and "betas" in calls[2].problem
