"""The install's torch index probe: PyTorch's CPU index when it answers, else PyPI at once.

Hosts without the CPU index (this development machine, air-gapped sites) must not wait on it, and
the install output must say which index torch came from.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from torch_index import choose_index, torch_requirement

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: nothing listens there


class _TorchPage(BaseHTTPRequestHandler):
    """A stand-in for the CPU index: /torch/ exists, nothing else does."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/torch/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def index_url():
    server = HTTPServer(("127.0.0.1", 0), _TorchPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_unreachable_index_falls_back_to_pypi_at_once_and_says_so():
    started = time.monotonic()
    options, message = choose_index(UNREACHABLE)
    assert time.monotonic() - started < 2
    assert options == []
    assert UNREACHABLE in message and "unreachable" in message and "PyPI" in message


def test_reachable_index_is_added_for_pip(index_url):
    options, message = choose_index(index_url)
    assert options == ["--extra-index-url", index_url]
    assert index_url in message and "CPU wheel index" in message


def test_empty_index_url_means_pypi_without_probing():
    assert choose_index("") == ([], "torch: TORCH_INDEX_URL is empty: torch comes from PyPI")


def test_only_the_torch_pin_of_the_stack_is_kept():
    stack_in = "# IPEX stack\ntorch==2.8.0\nintel-extension-for-pytorch==2.8.0\ntransformers==4.51.3\n"
    assert torch_requirement(stack_in) == "torch==2.8.0\n"
    with pytest.raises(SystemExit, match="one torch==X line"):
        torch_requirement("transformers==4.51.3\n")


def test_command_line_as_install_sh_runs_it(tmp_path):
    """stdout carries only pip's options, stderr the message; the requirements file is written."""
    out = tmp_path / "requirements.txt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "torch_index.py"), str(ROOT / "requirements" / "ipex.in"),
         str(out), "--index-url", UNREACHABLE],
        capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == ""
    assert "torch comes from PyPI" in result.stderr
    requirements = out.read_text()
    assert requirements == "torch==2.8.0\n"
