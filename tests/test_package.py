import subprocess
import sys

import torch

import freezeguard as fg


def test_import_compiles_nothing_and_exposes_public_names():
    code = ("import sys, freezeguard as fg; "
            "assert 'freezeguard._C' not in sys.modules and 'freezeguard._cuda' not in sys.modules; "
            "assert 'triton' not in sys.modules; print(fg.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fg.__version__


def test_available_backends_lists_the_reference():
    assert "torch" in fg.available_backends()


def test_forcing_unknown_backend_names_choices():
    import pytest

    with pytest.raises(ValueError, match="unknown backend"):
        fg.ops.segment_dot([torch.ones(2)], [torch.ones(2)], backend="nope")


def test_cli_help_and_info_run():
    from freezeguard.cli import main

    assert main(["info"]) == 0
