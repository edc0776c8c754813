"""docker/keys.py against a real TorchServe with token authorization: a key is handed out as it
is until it is about to expire, then renewed through TorchServe's token API with the API key;
the renewed key is served and the one it replaced is refused. The container smoke test
(scripts/container.sh smoke) shows the same past a real 1-minute expiry."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from .server import package, running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docker"))
import keys  # noqa: E402

pytestmark = pytest.mark.integration
MODEL_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1, "responseTimeout": 60,
                "handler": {"max_prompt_tokens": 32, "max_new_tokens": 4, "default_max_new_tokens": 2}}


def test_keys_are_shared_until_about_to_expire_then_renewed(tmp_path, model_dir, monkeypatch):
    store = package(tmp_path, model_dir, "smollm2", MODEL_CONFIG)
    with running_server(tmp_path, store, ["smollm2=smollm2.mar"], token_auth=True,
                        properties={"token_expiration_min": "1"}) as urls:
        monkeypatch.setattr(keys, "KEY_FILE", tmp_path / "key_file.json")
        monkeypatch.setattr(keys, "MANAGEMENT", urls["management"])

        def predict(key: str) -> int:
            return requests.post(f"{urls['inference']}/predictions/smollm2", json={"prompt": "Hi"},
                                 headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code

        first, left = keys.valid_key("inference", min_valid_s=0)
        assert first == urls["key"] and 0 < left <= 60
        assert keys.valid_key("inference", min_valid_s=0)[0] == first  # not about to expire: shared
        monkeypatch.setenv(keys.LIFETIME_ENV, "600")  # a quarter of 10 min > the 1-min key's life: renew
        renewed, left = keys.valid_key("inference")
        assert renewed != first and left > 50
        assert json.loads((tmp_path / "key_file.json").read_text())["inference"]["key"] == renewed
        assert predict(first) == 400 and predict(renewed) == 200
        management, _ = keys.valid_key("management")
        models = requests.get(f"{urls['management']}/models", headers={"Authorization": f"Bearer {management}"},
                              timeout=10)
        assert models.status_code == 200 and models.json()["models"][0]["modelName"] == "smollm2"


def test_seconds_left_reads_torchserves_nanosecond_timestamps():
    soon = datetime.now(timezone.utc) + timedelta(seconds=120)
    stamp = soon.strftime("%Y-%m-%dT%H:%M:%S") + f".{soon.microsecond:06d}294Z"  # as key_file.json has it
    assert 118 < keys.seconds_left({"expiration time": stamp}) <= 120
    assert keys.seconds_left({"expiration time": "2000-01-01T00:00:00.123456789Z"}) < 0
