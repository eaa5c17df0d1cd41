"""`freezeguard` command line: one subcommand per module in freezeguard/cli/ (``example-pipeline``: example_pipeline.py).

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Order shown in --help. A module that fails to import (an optional dependency missing)
# still appears, and says what is missing when run.
COMMANDS = ("info", "demo", "example-pipeline", "erase", "finetune", "learn", "evaluate", "verify", "bench")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when it says something: not for flags, None, or help that already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if quiet_default or "(default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from freezeguard._version import __version__

    parser = argparse.ArgumentParser(
        prog="freezeguard",
        description="FreezeAsGuard: learn which tensors of a diffusion model to freeze so illegal "
                    "fine-tunes fail while legal ones work, and enforce the mask with fused kernels.",
    )
    parser.add_argument("--version", action="version", version=f"freezeguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"freezeguard.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("freezeguard.cli"):
                continue  # command not part of this build
            missing = exc.name
            p = sub.add_parser(name, help=f"(unavailable: needs {missing})")
            p.set_defaults(func=lambda args, m=missing: _missing(m))
            continue
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _missing(name: str) -> int:
    print(f"freezeguard: this command needs the Python package {name!r}; "
          f"install it with: pip install 'freezeguard[diffusion]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
