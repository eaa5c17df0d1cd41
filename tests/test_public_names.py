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
