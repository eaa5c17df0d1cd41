"""The public names import the way Python users try them first."""
from __future__ import annotations

import subprocess
import sys


def test_import_freezeguard_baselines_is_fg_baselines():
    code = ("import freezeguard.baselines as b, freezeguard as fg; "
            "assert fg.baselines is b; assert callable(b.uce_edit) and callable(b.harness.resolve_methods); "
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_bench_presets_under_their_name_and_the_former_one_with_a_warning():
    import warnings

    import freezeguard as fg
    from freezeguard.integrations.diffusers import bench_presets
    assert fg.diffusion.bench_presets is bench_presets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fg.diffusion.layouts is bench_presets
    assert any(issubclass(w.category, DeprecationWarning) and "bench_presets" in str(w.message) for w in caught)
