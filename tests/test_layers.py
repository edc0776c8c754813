"""The layering of handlers/cpu_llm (docs/development.md), enforced by import-linter: every import
points down, lazy and TYPE_CHECKING imports included, and no package's modules import in a cycle.
The contracts live in pyproject.toml ([tool.importlinter])."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    """`lint-imports` of this venv, with the handlers folder importable (cpu_llm lives there)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "handlers")}, timeout=300)


def test_every_import_points_down_and_none_forms_a_cycle():
    result = lint_imports("--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout
