"""Helpers to package the default model and run a real TorchServe on loopback test ports."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

import serve
from build_archive import build_archive

TEST_PORTS = {"inference": 18080, "management": 18081, "metrics": 18082}
# Make the venv's torchserve / torch-model-archiver reachable whatever PATH pytest got.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def package(tmp: Path, model_dir: Path, name: str, model_config: dict) -> Path:
    """Build `name.mar` into tmp/store from a model-config dict; returns the store folder."""
    config_path = tmp / f"{name}-model-config.yaml"
    config_path.write_text(yaml.safe_dump(model_config))
    store = tmp / "store"
    build_archive(model_dir, name, config_path, store)
    return store


@contextmanager
def running_server(tmp: Path, store: Path, models: list[str], timeout: float = 240,
                   ports: dict[str, int] = TEST_PORTS, token_auth: bool = False,
                   properties: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """TorchServe on the test ports; yields the endpoint URLs and always stops it.

    With `token_auth` TorchServe's token authorization is on (as it is by default): the server
    runs in `tmp`, where it writes key_file.json, and the inference key is yielded as "key".
    `properties` are added to config.properties (e.g. token_expiration_min)."""
    (tmp / "java-tmp").mkdir(exist_ok=True)
    ts_config = serve.write_ts_config(tmp, ports, java_tmp=tmp / "java-tmp")
    if properties:
        ts_config.write_text(ts_config.read_text() + "".join(f"{k}={v}\n" for k, v in properties.items()))
    if not token_auth:
        with serve.running(ts_config, store, models, tmp / "logs", timeout) as urls:
            yield urls
        return
    lines = ts_config.read_text().splitlines()
    ts_config.write_text("\n".join(line for line in lines if not line.startswith("disable_token_authorization")) + "\n")
    key_file = tmp / "key_file.json"
    cwd = os.getcwd()
    os.chdir(tmp)  # TorchServe writes key_file.json into its working directory
    urllib.request.install_opener(urllib.request.build_opener(_ManagementKey(key_file)))
    try:
        with serve.running(ts_config, store, models, tmp / "logs", timeout) as urls:
            yield {**urls, "key": json.loads(key_file.read_text())["inference"]["key"]}
    finally:
        urllib.request.install_opener(None)
        os.chdir(cwd)


class _ManagementKey(urllib.request.BaseHandler):
    """Adds the management key to urllib requests: serve.py polls the management API for READY
    workers, which needs it once token authorization is on (the key appears in key_file.json
    when the frontend starts)."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        if self.key_file.exists() and not request.has_header("Authorization"):
            key = json.loads(self.key_file.read_text())["management"]["key"]
            request.add_header("Authorization", f"Bearer {key}")
        return request


# Bodies that are not a JSON object, as clients send them: each must get a 400 naming "body",
# in both batching modes (requests.post keyword arguments).
NOT_JSON_BODIES = {
    "form-encoded": {"data": "prompt=hello", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
    "multipart field": {"files": {"prompt": (None, "hello")}},
    "multipart file": {"files": {"file": ("prompt.txt", b"hello", "text/plain")}},
    "empty, JSON type": {"data": b"", "headers": {"Content-Type": "application/json"}},
    "empty, no type": {"data": b""},
    "plain text": {"data": "hello", "headers": {"Content-Type": "text/plain"}},
    "octet-stream": {"data": b"\x00\xffhello", "headers": {"Content-Type": "application/octet-stream"}},
}


def assert_not_json_bodies_get_a_400(url: str, headers: dict[str, str] | None = None, copies: int = 3) -> None:
    """Send every NOT_JSON_BODIES kind `copies` times at once; each must be answered with a 400 naming the body."""
    import requests
    from concurrent.futures import ThreadPoolExecutor

    def post(kind: str) -> tuple[str, int, dict]:
        options = NOT_JSON_BODIES[kind]
        response = requests.post(url, **{**options, "headers": {**(headers or {}), **options.get("headers", {})}},
                                 timeout=60)
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {"unparsed": response.text[:200]}
        return kind, response.status_code, error

    kinds = [kind for kind in NOT_JSON_BODIES for _ in range(copies)]
    with ThreadPoolExecutor(len(kinds)) as pool:
        answers = list(pool.map(post, kinds))
    wrong = [(kind, status, error) for kind, status, error in answers if status != 400 or error.get("field") != "body"]
    assert not wrong, wrong
