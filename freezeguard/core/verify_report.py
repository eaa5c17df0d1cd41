"""What ``fg.verify`` reports: the outcome, every finding, and the two ways it is printed.

:class:`VerifyReport` holds the status (ok / violation / cannot_verify, with the CLI's exit codes
0 / 1 / 2), the changed frozen tensors, the adapters on frozen modules, everything the audit
cannot vouch for, and how many keys fell in each class. ``to_dict()`` is the ``--json`` schema
(docs/security.md); ``summary()`` the text ``freezeguard verify`` prints. The audit itself is
``core.verify``.

Example:
    >>> report = VerifyReport(ok=False, violations=[("weight", 0.5)]).finish()
    >>> report.status, report.exit_code, report.to_dict()["violations"]
    ('violation', 1, [{'name': 'weight', 'max_abs_diff': 0.5}])
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

_LISTED = 1000  # keys listed per class in a report; the counts are always complete


@dataclass
class VerifyReport:
    """Result of :func:`verify` (``to_dict()`` is the ``--json`` schema, docs/security.md).

    Attributes:
        ok: True only when ``status == "ok"``.
        status: ``"ok"``, ``"violation"`` or ``"cannot_verify"``; :attr:`exit_code` 0, 1, 2.
        violations: ``(name, max_abs_diff)`` per frozen tensor that differs (``inf`` if reshaped).
        lora_violations: ``(adapter_key, frozen_name)`` per adapter weight hanging on a module
            that owns a frozen tensor (any tuner type).
        cannot_verify: ``(key or file, reason)`` for everything the audit cannot vouch for.
        classes: how many keys fell in each class (``compared``, ``compared_frozen``,
            ``adapter``, ``other_part``, ``unmapped``).
        parts: keys per pipeline part the mask does not cover.
        files: the file sets read: ``{"path", "part", "keys", "formats"}``.
        notes: what the auditor should know.
        checked: frozen tensors compared (a tensor present in several files counts each time).
        missing: frozen tensors in no file set (an adapter upload keeps them as released).
    """

    ok: bool
    status: str = "ok"
    violations: list[tuple[str, float]] = field(default_factory=list)
    lora_violations: list[tuple[str, str]] = field(default_factory=list)
    cannot_verify: list[tuple[str, str]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("compared", "compared_frozen", "adapter", "other_part", "unmapped"), 0))
    parts: dict[str, int] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0
    missing: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def exit_code(self) -> int:
        """0 ok, 1 violations, 2 cannot verify (the CLI's exit status)."""
        return {"ok": 0, "violation": 1}.get(self.status, 2)

    def finish(self) -> "VerifyReport":
        """Set ``status`` and ``ok`` from the findings (a violation wins over cannot_verify)."""
        self.status = ("violation" if self.violations or self.lora_violations
                       else "cannot_verify" if self.cannot_verify else "ok")
        self.ok = self.status == "ok"
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        # JSON has no inf; a reshaped tensor reports null.
        d["violations"] = [{"name": n, "max_abs_diff": (v if v != float("inf") else None)}
                           for n, v in self.violations]
        d["lora_violations"] = [{"key": k, "frozen": f} for k, f in self.lora_violations[:_LISTED]]
        d["lora_violations_count"] = len(self.lora_violations)
        d["cannot_verify"] = [{"key": k, "reason": r} for k, r in self.cannot_verify[:_LISTED]]
        d["cannot_verify_count"] = len(self.cannot_verify)
        return d

    def summary(self) -> str:
        head = {"ok": "OK", "violation": "VIOLATION", "cannot_verify": "CANNOT VERIFY"}[self.status]
        c = self.classes
        lines = [f"{head}: {self.checked} frozen tensor(s) compared, {len(self.violations)} changed, "
                 f"{len(self.lora_violations)} adapter weight(s) on frozen modules, "
                 f"{len(self.cannot_verify)} key(s)/file(s) cannot be verified",
                 f"  keys: {c['compared']} compared ({c['compared_frozen']} frozen), {c['adapter']} adapter, "
                 f"{c['other_part']} other part(s) {self.parts or ''}, {c['unmapped']} unmapped"]
        lines += [f"  read     {f['path']}  ({f['part']}, {f['keys']} keys"
                  + (f", formats: {', '.join(f['formats'])}" if f["formats"] else "") + ")" for f in self.files]
        lines += [f"  changed  {n}  max|diff|={v:.6g}" for n, v in self.violations]
        lines += [f"  adapter  {k}  -> {f}" for k, f in self.lora_violations[:_LISTED]]
        lines += [f"  cannot verify  {k}: {r}" for k, r in self.cannot_verify[:50]]
        if len(self.cannot_verify) > 50:
            lines.append(f"  ... and {len(self.cannot_verify) - 50} more (--json lists {_LISTED})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


__all__ = ["VerifyReport"]
