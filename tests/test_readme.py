"""The README is for users: their order of sections, no internal references, its terms defined,
each measured figure dated (the walkthrough itself runs in tests/test_hardening.py)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

ORDER = ["Install", "Quick start", "Guard your fine-tuning script", "Security", "The publisher's workflow", "Models",
         "Command line", "What the demo shows", "Backends", "Tests and benchmarks", "Layout", "Glossary"]


def test_sections_come_in_the_order_users_expect():
    titles = re.findall(r"^## (.+)$", README, flags=re.M)
    found = [next((t for t in titles if t.startswith(o)), None) for o in ORDER]
    assert None not in found, dict(zip(ORDER, found, strict=True))
    assert [titles.index(t) for t in found] == sorted(titles.index(t) for t in found)


def test_no_internal_references():
    for path in (ROOT / "README.md", ROOT / "docs" / "research-log.md"):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\bissue[- ]?\d+", r"\bthe issue\b", r"issue's", r"\bbars?\b"):
            assert not re.search(pattern, text, flags=re.I), (path.name, pattern, re.search(pattern, text, re.I))


def test_terms_are_defined_in_the_glossary():
    glossary = README[README.index("## Glossary"):]
    for term in ("θ_ft", "Releaser", "Innocent (legal)", "Mitigation", "Equal harm", "Reliability", "prompt_gain",
                 "recognisability", "Live logits", "freeze ratio", "Attacker"):
        assert term in glossary, term
    assert "sd15-s" in README[README.index("## Command line"):README.index("## What the demo shows")]


def test_every_timing_carries_its_date():
    for paragraph in re.split(r"\n\s*\n", README):
        # a duration (not "timestep 1000 s", the flow-matching scale)
        if re.search(r"(?<!timestep )\b\d+(\.\d+)? ?(ms|min|s)\b", paragraph) and not paragraph.lstrip().startswith("|"):
            assert re.search(r"2026-\d\d-\d\d", paragraph), paragraph[:300]


def test_the_demo_section_states_the_rule_its_verdict_and_where_the_figures_come_from():
    section = README[README.index("## What the demo shows"):README.index("## Backends")]
    assert "Placeholder" not in section
    assert "decision rule" in section.lower() and "verdict" in section.lower()
    assert "freezeguard demo" in section and re.search(r"2026-\d\d-\d\d", section)
    for link in ("docs/evaluation.md", "docs/research-log.md", "freezeguard/apps/evaluate/verdict.py"):
        assert link in section and (ROOT / link).exists(), link
