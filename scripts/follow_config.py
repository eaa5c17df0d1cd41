"""How far does a config travel? Follow one through the package and count the files it visits.

A reader who follows a setting from where it is given to where it is used opens one file after
another; every time the path leaves a file and comes back later, the reader turns back. This
script measures that path with the project's own code, under ``sys.setprofile``:

- a **call** is recorded when a Python function defined in a ``freezeguard/`` file is entered and
  one of its arguments (``self`` included, so a config's own methods count; positional,
  keyword-only, ``*args`` items or ``**kwargs`` values) is a
  followed config: an instance of ``DemoConfig`` or ``LearnerConfig`` (copies made by
  ``replace()`` count: they carry the same settings) or, for the CLI, the ``argparse.Namespace``;
- a **stay** is a maximal run of consecutive recorded calls in one file;
- a **return** is a stay in a file that an earlier stay already visited;
- **files** is the number of distinct files with a recorded call.

Calls made while a module is being imported are left out (a module-level config is built by
whichever path imports it first). What the measure cannot see: a setting read off the config and
handed on as a plain value travels without being followed, so it counts the object's path, not
every value's.

Two paths are measured:

- ``demo``: ``run_demo(DemoConfig.quick(), out_dir=None, progress=False, workers=1)``, the whole
  quick demo in this process (a few minutes on one core);
- ``cli-learn``: ``freezeguard learn`` (``freezeguard.cli.main``) for 2 steps on the tiny SD
  pipeline and image folders of ``freezeguard.integrations.diffusers.example``, as the tests run it.

Usage:
    OMP_NUM_THREADS=1 python scripts/follow_config.py [demo|cli-learn ...] [--stays]

Prints one line per path (``--stays`` also lists the stays, in order).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import freezeguard  # noqa: E402

PACKAGE = str(Path(freezeguard.__file__).resolve().parent)


def _importing(frame) -> bool:
    """True while a module body runs (a module-level constant is built at import, whoever imports first)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def follow(run: Callable[[], object], config_types: tuple[type, ...]) -> list[tuple[str, str]]:
    """Run ``run()`` under a profiler; returns (file relative to the package, function) per recorded call."""
    calls: list[tuple[str, str]] = []
    in_package: dict[object, str | None] = {}

    def profile(frame, event, _arg):
        if event != "call":
            return
        code = frame.f_code
        rel = in_package.get(code, "")
        if rel == "":
            name = str(Path(code.co_filename).resolve())
            rel = in_package[code] = name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + "/") else None
        if rel is None:
            return
        n = code.co_argcount + code.co_kwonlyargcount
        names = list(code.co_varnames[:n + bool(code.co_flags & 4) + bool(code.co_flags & 8)])
        local = frame.f_locals
        values = []
        for i, arg in enumerate(names):
            value = local.get(arg)
            if i >= n and isinstance(value, tuple):
                values.extend(value)            # *args
            elif i >= n and isinstance(value, dict):
                values.extend(value.values())   # **kwargs
            else:
                values.append(value)
        if any(isinstance(v, config_types) for v in values) and not _importing(frame):
            calls.append((rel, code.co_qualname))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def stays(calls: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Maximal runs of consecutive calls in one file: (file, its functions in order)."""
    out: list[tuple[str, list[str]]] = []
    for rel, func in calls:
        if out and out[-1][0] == rel:
            out[-1][1].append(func)
        else:
            out.append((rel, [func]))
    return out


def summarise(calls: list[tuple[str, str]]) -> dict[str, int]:
    runs = stays(calls)
    seen: set[str] = set()
    returns = 0
    for rel, _ in runs:
        returns += rel in seen
        seen.add(rel)
    return {"files": len(seen), "stays": len(runs), "returns": returns, "calls": len(calls)}


def demo_path() -> list[tuple[str, str]]:
    from freezeguard.apps.demo import DemoConfig, run_demo
    from freezeguard.apps.learn.config import LearnerConfig

    cfg = DemoConfig.quick()
    return follow(lambda: run_demo(cfg, out_dir=None, progress=False, workers=1), (DemoConfig, LearnerConfig))


def cli_learn_path() -> list[tuple[str, str]]:
    from freezeguard.apps.learn.config import LearnerConfig
    from freezeguard.cli import main
    from freezeguard.integrations.diffusers.example import build_tiny_sd_pipeline, write_tiny_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pre = build_tiny_sd_pipeline(root / "pre", seed=0)
        ft = build_tiny_sd_pipeline(root / "ft", seed=1)   # same layout, other weights: a stand-in fine-tune
        target = write_tiny_imagefolder(root / "target", n=4, caption="sks stripes", seed=1, style="stripes")
        innocent = write_tiny_imagefolder(root / "innocent", n=4, caption="a checker", seed=2, style="checker")
        argv = ["learn", "--pretrained", str(pre), "--finetuned", str(ft), "--target-data", str(target),
                "--innocent-data", str(innocent), "--freeze-ratio", "0.25", "--out", str(root / "mask.safetensors"),
                "--steps", "2", "--quiet", "--backend", "torch", "--threads", "1", "--json"]
        with contextlib.redirect_stdout(io.StringIO()):  # the command's JSON summary is not this script's output
            calls = follow(lambda: main(argv), (argparse.Namespace, LearnerConfig))
    return calls


PATHS = {"demo": demo_path, "cli-learn": cli_learn_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", metavar="PATH", help=f"any of {', '.join(PATHS)} (default: all)")
    parser.add_argument("--stays", action="store_true", help="list every stay")
    args = parser.parse_args()
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    for name in args.paths or list(PATHS):
        calls = PATHS[name]()
        figures = summarise(calls)
        print(f"{name}: {figures['files']} files, {figures['stays']} stays, {figures['returns']} returns "
              f"({figures['calls']} calls)")
        if args.stays:
            for rel, funcs in stays(calls):
                print(f"  {rel}: {', '.join(dict.fromkeys(funcs))}")


if __name__ == "__main__":
    main()
