"""deploy/kubernetes (docs/kubernetes.md): every object validates against the Kubernetes schemas,
strictly and offline, and the values that must agree with the image and with TorchServe agree.

No cluster and no server: kubernetes-validate ships the OpenAPI schemas of each Kubernetes release
("strict" ones reject unknown fields, so a misspelt or misplaced key fails here, not at apply).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"
APP = "torchserve-llm-cpu"
ADAPTER_RULES = "prometheus-adapter-rules.yaml"


def documents() -> list[tuple[str, int, dict]]:
    """(file name, index in the file, document) of every non-empty YAML document."""
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document:
                found.append((path.name, index, document))
    return found


def kubernetes_objects() -> list[tuple[str, int, dict]]:
    """Every document but kustomize's own file, which is not an object of the cluster."""
    return [d for d in documents() if not d[2].get("apiVersion", "").startswith("kustomize.config.k8s.io/")]


def the(kind: str, file: str | None = None) -> dict:
    matches = [d for name, _, d in kubernetes_objects() if d["kind"] == kind and file in (None, name)]
    assert len(matches) == 1, f"expected one {kind} in {MANIFESTS.relative_to(ROOT)}, found {len(matches)}"
    return matches[0]


def container() -> dict:
    containers = the("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(name: str) -> str:
    values = [e["value"] for e in container().get("env", []) if e["name"] == name]
    assert len(values) == 1, f"the container sets {name} {len(values)} times"
    return values[0]


def properties(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].strip("/"))


def image_path(path: str) -> Path:
    """The repository file the Dockerfile copies to `path` in the image (COPY <dir>/ /app/<dir>/)."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "COPY" and path.startswith(parts[2]):
            return ROOT / parts[1] / path[len(parts[2]):]
    raise AssertionError(f"the Dockerfile copies nothing to {path}")


def adapter_rules() -> list[dict]:
    config = yaml.safe_load(the("ConfigMap", ADAPTER_RULES)["data"]["config.yaml"])
    return config["rules"]


def torchserve_metrics() -> dict:
    """TorchServe's own metrics.yaml, from the installed `ts` package (without importing it)."""
    spec = importlib.util.find_spec("ts")
    assert spec is not None and spec.submodule_search_locations, "torchserve is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "configs" / "metrics.yaml"
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name, index, document", kubernetes_objects(),
                         ids=[f"{n}:{i}:{d.get('kind')}" for n, i, d in kubernetes_objects()])
def test_every_object_validates_strictly(name, index, document):
    # Raises ValidationError (wrong type, unknown or missing field) or SchemaNotFoundError (a
    # kind or apiVersion this Kubernetes release does not have).
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_strict_validation_rejects_an_unknown_field():
    """The check above can fail: a misplaced key is an error, not a warning."""
    deployment = yaml.safe_load((MANIFESTS / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriodSeconds"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_adapter_rules():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    expected = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml", ADAPTER_RULES}
    assert sorted(kustomization["resources"]) == sorted(expected)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds():
    """What `kubectl apply -k deploy/kubernetes` would send: the listed files' objects."""
    built = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    expected = sorted(d["kind"] for name, _, d in kubernetes_objects() if name in listed)
    assert sorted(d["kind"] for d in yaml.safe_load_all(built.stdout) if d) == expected


def test_every_selector_matches_the_pods():
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": the("Deployment")["spec"]["selector"]["matchLabels"],
        "Service": the("Service")["spec"]["selector"],
        "PodDisruptionBudget": the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": the("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= labels.items(), f"the {kind} selects no pod of the Deployment"


def test_grace_period_covers_the_drain():
    """SIGTERM comes after preStop; the entry point then drains for up to SHUTDOWN_GRACE_S and
    stops TorchServe: the kubelet's SIGKILL (at terminationGracePeriodSeconds) must come later."""
    grace = float(env("SHUTDOWN_GRACE_S"))
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "/bin/sleep"
    period = the("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 0
    assert period >= float(pre_stop[1]) + grace + 5, (period, pre_stop, grace)


def test_probes_run_the_images_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container()[probe]["exec"]["command"]
        assert command[0] == "/opt/venv/bin/python" and "python3 -m venv /opt/venv" in dockerfile
        script = image_path(command[1])
        assert script == ROOT / "docker" / "healthcheck.py" and script.is_file(), (probe, command)
        # A timeout under the default 1 s would fail a Python start on a busy pod.
        assert container()[probe]["timeoutSeconds"] >= 5, probe
    # Startup must allow a model load of several minutes before the kubelet restarts it.
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_ports_match_config_properties():
    config = properties(ROOT / "docker" / "config.properties")
    inference, metrics = port_of(config["inference_address"]), port_of(config["metrics_address"])
    assert config["management_address"].startswith("http://127.0.0.1:")
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": inference, "metrics": metrics}  # management stays inside the pod
    service = the("Service")
    assert {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]} == {inference: inference,
                                                                                     metrics: metrics}
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    policy_ports = {p["port"] for rule in the("NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert policy_ports == {inference, metrics}


def test_runs_as_the_images_user():
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    pod = the("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsUser"] == uid and pod["runAsNonRoot"] is True
    security = container()["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_guaranteed_qos_with_whole_cpus():
    """requests == limits and an integer CPU count: the static CPU manager then pins cores."""
    resources = container()["resources"]
    assert resources["requests"] == resources["limits"]
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert re.fullmatch(r"[1-9][0-9]*", str(resources["limits"]["cpu"]))


def test_hpa_scales_the_deployment_on_the_adapters_metric():
    hpa = the("HorizontalPodAutoscaler")
    deployment = the("Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"], "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    # minAvailable 1 in the PodDisruptionBudget lets a drain evict a pod only with a second one.
    assert hpa["spec"]["minReplicas"] > the("PodDisruptionBudget")["spec"]["minAvailable"]
    # The HPA owns the replica count; a count in the Deployment would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    [rule] = [r for r in adapter_rules() if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    # Pods metrics need the series mapped to namespaces and pods.
    assert sorted(v["resource"] for v in rule["resources"]["overrides"].values()) == ["namespace", "pod"]


def test_adapter_rule_reads_torchserves_queue_latency_counter():
    [rule] = adapter_rules()
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
    assert series == "ts_queue_latency_microseconds"
    assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
    # A frontend counter of TorchServe (rate() of a counter), with the `hostname` label the
    # rule maps to the pod.
    counters = {m["name"]: m for m in torchserve_metrics()["ts_metrics"]["counter"]}
    assert series in counters
    assert "hostname" in counters[series]["dimensions"] and "hostname" in rule["resources"]["overrides"]
    assert "rate(<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
    assert properties(ROOT / "docker" / "config.properties")["metrics_mode"] == "prometheus"
    assert f"`{series}`" in (ROOT / "docs" / "metrics.md").read_text()
