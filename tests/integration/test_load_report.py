"""The load-test sweep end to end (smoke size): real TorchServe, real Locust, report files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serve import ROOT

pytestmark = pytest.mark.integration


def test_sweep_writes_the_full_report(tmp_path, model_dir):
    offline = tmp_path / "offline.md"
    offline.write_text("| config | decode tok/s b1 |\n|---|---|\n| fp32 | 1.0 |\n")
    out = tmp_path / "load"
    subprocess.run([sys.executable, str(ROOT / "load_tests" / "sweep.py"), "--model-dir", str(model_dir),
                    "--concurrency", "1,2", "--arrival-rates", "2", "--duration", "10",
                    "--prompt-tokens", "16-48", "--output-tokens", "8", "--stream-share", "0.5",
                    "--offline", str(offline), "--out", str(out)], check=True, timeout=600)
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["shape"], r["level"]) for r in rows] == [("users", 1), ("users", 2), ("rate", 2)]
    for row in rows:
        assert row["requests"] > 0 and row["failures"] == 0, row
        assert row["total_output_tokens_per_s"] > 0 and row["latency_p50_ms"] > 0
        assert row["time_to_first_token_ms_p50"] > 0 and row["inter_token_latency_ms_p50"] > 0
        assert 0 < row["client_cpu_mean_pct"] < 100
    stats = {(e["method"], e["name"]): e for e in json.loads((out / "continuous-users-2.json").read_text())}
    assert {("POST", "generate-stream"), ("POST", "generate"), ("METRIC", "time_to_first_token_ms")} <= set(stats)
    # 8 output tokens per request (ignore_eos): the token total matches the request count
    assert stats["METRIC", "output_tokens_per_s"]["total_content_length"] == 8 * rows[1]["requests"]
    assert rows[1]["latency_p50_ms"] > rows[1]["time_to_first_token_ms_p50"]
    for name in ("summary.csv", "tokens_per_s.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| continuous.yaml | 2 users |" in report and "![latency.png](latency.png)" in report
    assert "Offline generation benchmark" in report and "| fp32 | 1.0 |" in report


def test_sweep_through_the_openai_api_puts_targets_side_by_side(tmp_path, model_dir):
    out = tmp_path / "load"
    subprocess.run([sys.executable, str(ROOT / "load_tests" / "sweep.py"), "--model-dir", str(model_dir),
                    "--api", "openai", "--config", str(ROOT / "configs" / "continuous.yaml"),
                    "--config", str(ROOT / "configs" / "model-config.yaml"), "--concurrency", "1", "--duration", "8",
                    "--prompt-tokens", "16", "--output-tokens", "8", "--stream-share", "1", "--out", str(out)],
                   check=True, timeout=600)
    rows = json.loads((out / "summary.json").read_text())
    assert [r["config"] for r in rows] == ["continuous.yaml", "model-config.yaml"]
    for row in rows:
        assert row["requests"] > 0 and row["failures"] == 0, row
        assert row["total_output_tokens_per_s"] > 0 and row["time_to_first_token_ms_p50"] > 0
    stats = {(e["method"], e["name"]): e for e in json.loads((out / "continuous-users-1.json").read_text())}
    assert stats["METRIC", "output_tokens_per_s"]["total_content_length"] == 8 * rows[0]["requests"]
    report = (out / "report.md").read_text()
    assert "OpenAI API" in report and "| continuous.yaml | 1 users |" in report and "| model-config.yaml | 1 users |" in report
