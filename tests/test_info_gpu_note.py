"""`freezeguard info` says what was verified on a GPU, when, on which commit, and whether the code moved on."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from freezeguard.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_names_the_gpu_run_its_commit_and_what_changed_since(capsys):
    record = json.loads((ROOT / "freezeguard" / "backends" / "verified_hardware.json").read_text())["cuda"]
    assert main(["info", "--json"]) == 0
    note = json.loads(capsys.readouterr().out)["gpu_verification"]
    assert record["date"] in note and f"commit {record['commit']}" in note
    # the commit is real (in this repository's history, where it has one)
    proc = subprocess.run(["git", "cat-file", "-t", record["commit"]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "not a git repository" in proc.stderr or proc.stdout.strip() == "commit"
    if record.get("not_reverified"):
        assert "not re-verified since" in note
    assert main(["info"]) == 0 and "GPU:" in capsys.readouterr().out
