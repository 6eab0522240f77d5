"""The packages import only downward (launcher > training > parallelism > translution_dist), with no cycles.

The contracts live in ``pyproject.toml`` under ``[tool.importlinter]``; this runs them over the
installed packages, so a new upward or circular import fails the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_test_helpers_are_not_shipped():
    """Code used only by tests lives under tests/, never in a package that production code could import."""
    shipped = [p for package in ("translution_dist", "parallelism", "training", "launcher")
               for p in (ROOT / package).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in shipped
                 if any(needle in p.read_text() for needle in ("helpers.processes", "helpers.reference",
                                                                "helpers.memory_measure", "helpers.bank_memory"))]
    assert not offenders, offenders
