"""`make help` (also plain `make`) lists every target with one line of description.

A target added without its `## description` would be missing from the list a new user reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def phony_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in re.findall(r"^\.PHONY:(.*)$", text, re.MULTILINE) for t in line.split()}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("args", [["help"], []], ids=["make help", "make"])
def test_help_lists_every_target_once_with_a_description(args):
    result = subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, check=True)
    listed = dict(re.findall(r"^  (\S+) +(\S.*)$", result.stdout, re.MULTILINE))
    assert set(listed) == phony_targets()
    assert len(result.stdout.splitlines()) == len(listed) + 1  # a usage line, then one per target
