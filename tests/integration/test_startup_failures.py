"""`scripts/serve.py start` must fail loudly, with the reason, instead of hanging or lying."""

from __future__ import annotations

import socket

import pytest

import serve
from serve import write_ts_config

from .server import TEST_PORTS, package, running_server

pytestmark = pytest.mark.integration


def test_port_in_use_is_reported(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # a port the OS says is free, now held by us
        blocker.listen()
        port = blocker.getsockname()[1]
        ts_config = write_ts_config(tmp_path, {**TEST_PORTS, "inference": port})
        with pytest.raises(serve.StartError, match=f"inference port 127.0.0.1:{port} is not free"):
            serve.start(ts_config, tmp_path, ["x=x.mar"], tmp_path / "logs", timeout=10)


def test_model_load_failure_is_reported_with_the_reason(tmp_path, model_dir):
    store = package(tmp_path, model_dir, "broken", {"handler": {"model_path": "/nonexistent/model"}})
    with pytest.raises(serve.StartError) as error:
        with running_server(tmp_path, store, ["broken=broken.mar"], timeout=120):
            pass
    message = str(error.value)
    assert "failed to load" in message
    assert "handler.model_path: folder /nonexistent/model does not exist" in message
    assert not serve._server_running()
