"""Everything in deploy/ is checked offline: Kubernetes manifests and the kustomize build
of every overlay against the Kubernetes schemas, the production invariants of the API and
worker Deployments and the worker HPA, the compose stack's references and roles, the
Containerfile's lint, dashboards and alerts against real metric names (and the alerts'
promtool unit tests), and the installed wheel's entry point serving a real stream."""

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
# The two roles: HTTP only (admission, the job queue, readers), and generation only.
API_ARGV = ["sserelay", "serve", "--api-only", "--host", "0.0.0.0", "--port", "8000"]
WORKER_ARGV = ["sserelay", "worker", "--host", "0.0.0.0", "--port", "8000"]

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


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def argv(container: dict[str, Any]) -> list[str]:
    """What the container runs: `command` replaces the image's ENTRYPOINT, `args` its CMD."""
    entrypoint = ["sserelay", "serve"]  # the Containerfile's
    return list(container.get("command", entrypoint)) + list(container.get("args", []))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


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
    deployment = named(docs, "Deployment", "sserelay")
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
    hpa = named(docs, "HorizontalPodAutoscaler", "sserelay")
    pdb = named(docs, "PodDisruptionBudget", "sserelay")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] or target.endswith("dev")
    # The API tier is HTTP only: generation runs in the workers.
    assert argv(container) == API_ARGV
    # The Secret the Deployment reads exists (dev) or is documented by a template (prod).
    ref = container["envFrom"][0]["secretRef"]["name"]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if target.endswith("dev"):
        assert [s["metadata"]["name"] for s in secrets] == [ref]
    else:
        template = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
        assert ref == template["metadata"]["name"] and not secrets


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod"])
def test_worker_deployment_is_production_shaped(target: str) -> None:
    docs = kustomize(K8S / target)
    api = named(docs, "Deployment", "sserelay")
    worker = named(docs, "Deployment", "sserelay-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert argv(container) == WORKER_ARGV
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000}
    for probe, path in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ]:
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"] and container["resources"]["limits"]["memory"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["privileged"]
    assert not pod["automountServiceAccountToken"]
    # SIGTERM: stop claiming, finish for SSERELAY_DRAIN_TIMEOUT_S, then hand the rest
    # over; SIGKILL must not land before the hand-over.
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env["SSERELAY_DRAIN_TIMEOUT_S"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    assert pod["terminationGracePeriodSeconds"] >= drain + pre_stop.get("seconds", 0) + 5
    # The same config file, Secret (SSERELAY_REDIS_URL, provider keys) and env as the API.
    api_container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == api_container["envFrom"]
    api_env = {e["name"]: e.get("value") for e in api_container["env"]}
    for name in ("SSERELAY_CONFIG", "SSERELAY_LOG_FORMAT", "SSERELAY_DRAIN_TIMEOUT_S"):
        assert env[name] == api_env[name], name
    volumes = {v["name"]: v for v in pod["volumes"]}
    api_volumes = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"] == api_volumes["config"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert env["SSERELAY_CONFIG"].startswith(mounts["/etc/sserelay"]["mountPath"] + "/")
    assert mounts["/etc/sserelay"]["readOnly"] and "/tmp" in mounts
    assert container["image"] == api_container["image"]
    # Replicas: one in dev, at least two in prod (one drains while the other takes over).
    hpa = named(docs, "HorizontalPodAutoscaler", "sserelay-worker")
    if target.endswith("dev"):
        assert worker["spec"]["replicas"] == 1 and hpa["spec"]["minReplicas"] == 1
    else:
        assert worker["spec"]["replicas"] >= 2 and hpa["spec"]["minReplicas"] >= 2
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod"])
def test_api_and_worker_selectors_stay_apart(target: str) -> None:
    """Client traffic reaches API pods only; the PDB, NetworkPolicy, Service and
    ServiceMonitor of the workers select the workers."""
    docs = kustomize(K8S / target)
    api = named(docs, "Deployment", "sserelay")
    worker = named(docs, "Deployment", "sserelay-worker")
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert selects(worker["spec"]["selector"]["matchLabels"], worker_labels)
    assert not selects(worker["spec"]["selector"]["matchLabels"], api_labels)
    assert not selects(api["spec"]["selector"]["matchLabels"], worker_labels)
    assert not selects(named(docs, "Service", "sserelay")["spec"]["selector"], worker_labels)
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        api_side = named(docs, kind, "sserelay")
        worker_side = named(docs, kind, "sserelay-worker")
        key = "podSelector" if kind == "NetworkPolicy" else "selector"
        assert selects(worker_side["spec"][key]["matchLabels"], worker_labels), kind
        assert not selects(worker_side["spec"][key]["matchLabels"], api_labels), kind
        assert not selects(api_side["spec"][key]["matchLabels"], worker_labels), kind
    # Evicting one worker at a time is always allowed, even with a single replica.
    assert named(docs, "PodDisruptionBudget", "sserelay-worker")["spec"]["maxUnavailable"] == 1
    # Scraped: a Service on the workers' port, selected by the ServiceMonitor.
    service = named(docs, "Service", "sserelay-worker")
    assert selects(service["spec"]["selector"], worker_labels)
    assert service["spec"]["clusterIP"] == "None"  # for scrapes, not for clients
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} & ports
    for name in ("sserelay", "sserelay-worker"):
        labels = named(docs, "Service", name)["metadata"]["labels"]
        assert selects(monitor["spec"]["selector"]["matchLabels"], labels), name
    # In: Prometheus on 8000. Out: DNS, Redis, HTTPS to providers.
    policy = named(docs, "NetworkPolicy", "sserelay-worker")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [8000]
    egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert {53, 6379, 443} <= egress


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod"])
def test_worker_hpa_scales_on_queue_depth_and_active_generations(target: str) -> None:
    docs = kustomize(K8S / target)
    hpa = named(docs, "HorizontalPodAutoscaler", "sserelay-worker")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sserelay-worker",
    }
    api_hpa = named(docs, "HorizontalPodAutoscaler", "sserelay")["spec"]
    assert api_hpa["scaleTargetRef"]["name"] == "sserelay"
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "sserelay_generations_active"
    assert metrics["External"]["external"]["metric"]["name"] == "sserelay_queue_depth"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    # The per-pod target is a share of the slots a worker has.
    worker = named(docs, "Deployment", "sserelay-worker")
    env = {
        e["name"]: e.get("value")
        for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    per_pod = float(metrics["Pods"]["pods"]["target"]["averageValue"])
    assert 0 < per_pod < float(env["SSERELAY_WORKER_CONCURRENCY"])
    assert hpa["minReplicas"] < hpa["maxReplicas"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_prometheus_adapter_rules_serve_the_hpa_metrics() -> None:
    """The HPA's custom and external metrics exist only if prometheus-adapter serves
    them: the documented rules name exactly those metrics, from series that exist."""
    path = K8S / "base" / "prometheus-adapter-rules.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "ConfigMap"
    config = yaml.safe_load(doc["data"]["config.yaml"])
    custom = {r["name"]["as"]: r for r in config["rules"]}
    external = {r["name"]["as"]: r for r in config["externalRules"]}
    hpa = yaml.safe_load((K8S / "base" / "worker-hpa.yaml").read_text())
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] in custom
    assert metrics["External"]["external"]["metric"]["name"] in external
    for name, rule in {**custom, **external}.items():
        assert rule["seriesQuery"].startswith(name + "{"), name
        assert (
            "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        )
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert custom["sserelay_generations_active"]["resources"]["overrides"]["pod"] == {
        "resource": "pod"
    }
    # The adapter's own file, not one of this app's resources.
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert path.name not in base["resources"]


def test_compose_references_only_files_that_exist() -> None:
    path = ROOT / "deploy" / "compose.yaml"
    compose = yaml.safe_load(path.read_text())
    assert set(compose["services"]) == {"api", "worker", "redis", "prometheus", "grafana"}
    build = compose["services"]["api"]["build"]
    context = (path.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), source


def test_compose_runs_an_api_and_workers() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    api, worker = services["api"], services["worker"]

    def compose_argv(service: dict[str, Any]) -> list[str]:
        return list(service.get("entrypoint", ["sserelay", "serve"])) + list(
            service.get("command", [])
        )

    assert compose_argv(api) == API_ARGV
    assert compose_argv(worker) == WORKER_ARGV
    assert worker["deploy"]["replicas"] >= 2
    # Replicas cannot share a host port or a container name.
    assert "ports" not in worker and "container_name" not in worker
    assert api["ports"] == ["8000:8000"]
    for name, service in (("api", api), ("worker", worker)):
        env = service["environment"]
        assert env["SSERELAY_REDIS_URL"].startswith("redis://redis:"), name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[env["SSERELAY_CONFIG"]] == "./k8s/base/sserelay.yaml", name
        assert service["image"] == api["image"], name
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert service["read_only"] and service["cap_drop"] == ["ALL"], name
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace > float(env["SSERELAY_DRAIN_TIMEOUT_S"]), name


def test_prometheus_scrapes_the_api_and_every_worker() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["sserelay"]["static_configs"] == [{"targets": ["api:8000"]}]
    # Every replica of the compose service, not whichever one DNS answers first.
    (sd,) = jobs["sserelay-worker"]["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A" and sd["port"] == 8000
    # Rule files resolve beside the config file, as compose mounts them.
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    config_dir = Path(mounts["./prometheus/prometheus.yml"]).parent
    for rule_file in config["rule_files"]:
        assert (ROOT / "deploy/prometheus" / rule_file).is_file()
        assert mounts[f"./prometheus/{rule_file}"] == str(config_dir / rule_file)
    # Kubernetes names the jobs after the Services the ServiceMonitor selects.
    docs = kustomize(K8S / "base")
    assert {"sserelay", "sserelay-worker"} <= {
        d["metadata"]["name"] for d in docs if d["kind"] == "Service"
    }


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="apt-get install -y prometheus (CI installs it)")
def test_promtool_checks_the_config_and_unit_tests_the_alerts() -> None:
    assert PROMTOOL
    prometheus = ROOT / "deploy" / "prometheus"
    for command in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        result = subprocess.run(
            [PROMTOOL, *command], cwd=prometheus, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_and_dashboard_cover_the_queue_and_the_workers() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert 'up{job="sserelay-worker"}' in alerts["SserelayNoWorkers"]
    assert "sserelay_queue_depth" in alerts["SserelayJobsNotClaimed"]
    assert "sserelay_generations_active" in alerts["SserelayJobsNotClaimed"]
    assert "sserelay_queue_depth" in alerts["SserelayQueueBackingUp"]
    assert "sserelay_queue_wait_seconds_bucket" in alerts["SserelayQueueWaitHigh"]
    assert "sserelay_takeovers_total" in alerts["SserelayFrequentTakeovers"]
    tests = yaml.safe_load((ROOT / "deploy/prometheus/alerts.test.yml").read_text())
    tested = {
        case["alertname"]
        for group in tests["tests"]
        for case in group["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert {"SserelayNoWorkers", "SserelayJobsNotClaimed", "SserelayFrequentTakeovers"} <= tested
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/sserelay.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for needle in (
        "sserelay_queue_depth",
        "histogram_quantile(0.95, sum by (le) (rate(sserelay_queue_wait_seconds_bucket",
        "sum by (instance) (sserelay_generations_active)",
        "sserelay_takeovers_total",
        "sum by (reason) (rate(sserelay_continuations_total",
    ):
        assert any(needle in expr for expr in exprs), needle
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # No two panels on the same spot.
    spots = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(spots) == len(set(spots))


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
