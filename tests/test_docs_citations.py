"""Every place that cites docs/DESIGN.md or docs/STYLE.md cites a file and a section the repository has."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources():
    for folder in ("freezeguard", "tests", "scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".md") and path.is_file() and path.name != Path(__file__).name:
                yield path
    yield ROOT / "pyproject.toml"


def test_design_and_style_citations_resolve():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, flags=re.M))
    assert (ROOT / "docs" / "STYLE.md").is_file() and sections >= {"1", "2", "3", "4", "5", "7", "8"}
    cited = 0
    for path in _sources():
        text = path.read_text(errors="replace")
        assert not re.search(r"(?<![/\w])(DESIGN|STYLE)\.md", text), f"{path}: cite docs/DESIGN.md or docs/STYLE.md"
        for number in re.findall(r"docs/DESIGN\.md,? section (\d+)", text):
            assert number in sections, f"{path} cites docs/DESIGN.md section {number}, which does not exist"
            cited += 1
        cited += text.count("docs/STYLE.md")
    assert cited >= 9
