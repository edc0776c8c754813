"""Where pip should take torch from: PyTorch's CPU wheel index when it answers, else PyPI.

PyPI's torch for Linux is the CUDA build (torch 2.8: about 3.7 GB of downloads with its nvidia-*
wheels); PyTorch's CPU index serves `torch==X+cpu`, which satisfies the locks' exact `torch==X`
pins and carries no CUDA libraries. The index is probed once, with a short timeout, so a host
without it (offline, or only PyPI reachable) falls back to PyPI at once and says so.

torch is therefore pinned in requirements/<stack>.in, not in the hashed locks (scripts/lock.py):
the two indexes serve different files. It is installed first, with its dependencies (on a
fallback to PyPI's torch, pip adds its CUDA libraries, at the versions that torch pins); the
locks follow with `--require-hashes --no-deps`.

Used by scripts/install.sh and the Dockerfile:

    pip_options=$(python3 scripts/torch_index.py requirements/native.in /tmp/torch.txt)
    pip install $pip_options -r /tmp/torch.txt

stdout: the pip options ("--extra-index-url URL", or nothing); stderr: which index was chosen.
TORCH_INDEX_URL overrides the index; set it empty to use PyPI without probing.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0


def probe(index_url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the index lists torch, else why not (one line, for the install output)."""
    try:
        # pip may be told to trust a proxy's CA through PIP_CERT; the probe must trust the same one.
        context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
        with urllib.request.urlopen(f"{index_url.rstrip('/')}/torch/", timeout=timeout, context=context):
            return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", None) or error)


def choose_index(index_url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[list[str], str]:
    """(pip options, message saying which index torch comes from)."""
    if not index_url:
        return [], "torch: TORCH_INDEX_URL is empty: torch comes from PyPI"
    reason = probe(index_url, timeout)
    if reason is None:
        return ["--extra-index-url", index_url], f"torch: from PyTorch's CPU wheel index {index_url} (no CUDA libraries)"
    return [], (f"torch: {index_url} is unreachable ({reason}): torch comes from PyPI and pip's "
                "configured indexes (on Linux PyPI's torch is the CUDA build: several GB more to download)")


def torch_requirement(stack_in: str) -> str:
    """The torch pin of requirements/<stack>.in, as a requirements file."""
    pins = [line.strip() for line in stack_in.splitlines() if line.strip().startswith("torch==")]
    if len(pins) != 1:
        raise SystemExit(f"torch_index: expected one torch==X line in the stack's .in file, found {len(pins)}")
    return pins[0] + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stack_in", type=Path, help="requirements/<stack>.in (its torch==X pin)")
    parser.add_argument("out", type=Path, help="where to write torch's requirement for pip")
    parser.add_argument("--index-url", default=os.environ.get("TORCH_INDEX_URL", DEFAULT_INDEX))
    parser.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S, help="seconds for the probe")
    args = parser.parse_args()
    args.out.write_text(torch_requirement(args.stack_in.read_text()))
    options, message = choose_index(args.index_url, args.timeout)
    print(message, file=sys.stderr)
    print(" ".join(options))


if __name__ == "__main__":
    main()
