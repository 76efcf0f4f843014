"""Everything in deploy/ is checked offline: Kubernetes manifests and the kustomize build
of every overlay against the Kubernetes schemas, the Deployment's production invariants,
the compose stack's references, the Containerfile's lint, dashboards and alerts against
real metric names, and the installed wheel's entry point serving a real stream."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from testkit.servers import ServerProcess, ServerThread
from testkit.sse import collect
from tests.support import ROOT, auth, relay_settings

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"

SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                        },
                    },
                },
            },
        },
    },
}


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "ServiceMonitor":  # a CRD: not in the Kubernetes schemas
        jsonschema.validate(doc, SERVICE_MONITOR)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed (apt-get install -y kubectl); .ci/run installs it"
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("target", ["base", "overlays/dev", "overlays/prod"])
def test_kustomize_builds_validate(target: str) -> None:
    docs = kustomize(K8S / target)
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "ServiceMonitor",
        "NetworkPolicy",
        "ServiceAccount",
    } <= kinds
    for doc in docs:
        validate(doc)
    if target == "overlays/dev":
        assert {"StatefulSet", "Secret", "Namespace"} <= kinds
    if target == "overlays/prod":
        assert "Ingress" in kinds and "StatefulSet" not in kinds


def test_every_manifest_file_validates() -> None:
    files = [
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml"
        and not p.name.endswith("-patch.yaml")
        and p.name != "sserelay.yaml"
    ]
    assert len(files) >= 10
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            validate(doc)


def test_the_config_map_is_a_valid_sserelay_config() -> None:
    from app.config import load_config

    load_config(K8S / "base" / "sserelay.yaml")


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod"])
def test_deployment_is_production_shaped(target: str) -> None:
    docs = kustomize(K8S / target)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert any(v["mountPath"] == "/tmp" for v in container["volumeMounts"])  # writable tmp
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env["SSERELAY_DRAIN_TIMEOUT_S"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] or target.endswith("dev")
    # The Secret the Deployment reads exists (dev) or is documented by a template (prod).
    ref = container["envFrom"][0]["secretRef"]["name"]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if target.endswith("dev"):
        assert [s["metadata"]["name"] for s in secrets] == [ref]
    else:
        template = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
        assert ref == template["metadata"]["name"] and not secrets


def test_compose_references_only_files_that_exist() -> None:
    path = ROOT / "deploy" / "compose.yaml"
    compose = yaml.safe_load(path.read_text())
    assert set(compose["services"]) == {"sserelay", "redis", "prometheus", "grafana"}
    build = compose["services"]["sserelay"]["build"]
    context = (path.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), source


def test_containerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(ROOT / "Containerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^USER \d+", text, re.M) and "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["sserelay", "serve"]' in text
    assert text.count("FROM ") == 2  # build stage, then a runtime without compilers


_METRIC = re.compile(r"\bsserelay_[a-z_]+")
_SUFFIXES = ("_bucket", "_count", "_sum")


async def test_dashboards_and_alerts_use_metrics_that_exist(config_path: Path) -> None:
    server = ServerThread(relay_settings(config_path))
    try:
        async with httpx.AsyncClient() as client:
            body = {"model": "sim-fast", "prompt": "metrics", "max_tokens": 5}
            async with client.stream(
                "POST", server.url + "/v1/chat/stream", json=body, headers=auth()
            ) as response:
                await collect(response)
            scrape = (await client.get(server.url + "/metrics")).text
    finally:
        server.stop()
    exposed = set(re.findall(r"^# TYPE (\S+)", scrape, re.M))
    exposed |= {f"{name}_total" for name in exposed}
    used: set[str] = set()
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/sserelay.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(_METRIC.findall(target["expr"]))
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule)
            used |= set(_METRIC.findall(rule["expr"]))
    assert len(used) >= 8
    for name in used:
        base = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
        assert base in exposed, f"{name} is used but not exposed"


async def test_the_installed_wheel_serves_a_stream(tmp_path: Path) -> None:
    """What the Containerfile does, without a container engine: build the wheel, install
    it into a fresh virtualenv, run `sserelay serve` (uvloop, httptools) from there."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheels.glob("sserelay-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    server = ServerProcess(
        env, args=[], executable=[str(venv / "bin" / "sserelay"), "serve"], cwd=tmp_path
    )
    try:
        async with httpx.AsyncClient() as client:
            dev = (await client.post(server.url + "/v1/auth/dev-token", json={})).json()
            headers = {"authorization": f"Bearer {dev['access_token']}"}
            async with client.stream(
                "POST",
                server.url + "/v1/chat/stream",
                headers=headers,
                json={"model": "sim-fast", "prompt": "wheel", "max_tokens": 5},
            ) as response:
                events = await collect(response)
            page = await client.get(server.url + "/")
        assert events.names[-1] == "done" and page.status_code == 200
    finally:
        output = server.stop()
    assert (
        "uvloop"
        in subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import uvloop, httptools; print('uvloop')"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert "listening on" in output
