"""The load-test sweep's targets: served configs, a running server, OpenAI-compatible peers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "load_tests"))
import sweep  # noqa: E402


def test_a_served_config_and_an_openai_peer_are_measured_side_by_side():
    args = argparse.Namespace(config=[Path("configs/continuous.yaml")], host=None, model="smollm2",
                              openai_target=["llama-server=http://127.0.0.1:8090/v1", "vllm=http://10.0.0.5:8000"])
    served, llama, vllm = sweep.targets(args)
    assert (served.label, served.config, served.openai_path) == ("continuous.yaml", Path("configs/continuous.yaml"), None)
    assert (llama.label, llama.host, llama.openai_path) == ("llama-server", "http://127.0.0.1:8090", "/v1")
    assert (vllm.host, vllm.openai_path) == ("http://10.0.0.5:8000", "/v1")
    assert sweep.openai_path("smollm2", "1.0") == "/predictions/smollm2/1.0/v1"
