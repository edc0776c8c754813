"""What `make serve` prints once the server is READY: the next step must be on screen."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import serve


def test_next_steps_give_a_working_curl_the_logs_and_how_to_stop():
    text = serve.next_steps("http://127.0.0.1:8080", "smollm2", Path("/srv/logs"), token_auth=False)
    lines = text.splitlines()
    curl = shlex.split(" ".join(line.rstrip("\\") for line in lines[1:3]))
    assert curl[:3] == ["curl", "-s", "http://127.0.0.1:8080/predictions/smollm2"]
    body = json.loads(curl[curl.index("-d") + 1])
    assert body["messages"][0]["role"] == "user" and body["max_new_tokens"] == 32
    assert "Authorization" not in text
    assert "Logs: /srv/logs/" in text
    assert lines[-1] == f"Stop: {serve.stop_command()}"


def test_next_steps_name_the_key_when_token_authorization_is_on():
    text = serve.next_steps("http://127.0.0.1:8080", "smollm2", Path("logs"), token_auth=True)
    assert 'Authorization: Bearer <inference key in key_file.json>' in text


def test_stop_command_names_the_stack_of_the_venv(monkeypatch):
    monkeypatch.setattr(serve.sys, "prefix", str(serve.ROOT / ".venv" / "ipex"))
    assert serve.stop_command() == "make stop STACK=ipex"
    monkeypatch.setattr(serve.sys, "prefix", str(serve.ROOT / ".venv" / "native"))
    assert serve.stop_command() == "make stop"
    monkeypatch.setattr(serve.sys, "prefix", "/usr")
    assert serve.stop_command() == "python scripts/serve.py stop"


def test_model_names_of_models_arguments():
    assert serve.model_names(["smollm2=smollm2.mar", "other.mar"]) == ["smollm2", "other"]
