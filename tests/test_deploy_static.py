"""Static checks of the deployment kit (Docker is not runnable here, so nothing is built):
Prometheus config and alert rules through promtool, and the compose file, Kubernetes manifests,
Dockerfile and Grafana provisioning parsed and cross-checked against the repo (files that exist,
ports that match, env names that the settings really read)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.redis_queue import RedisQueueSettings
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
API_PORT = 8000
WORKER_PORT = RedisQueueSettings.model_fields["worker_metrics_port"].default

# Every LESA_* variable the kit sets must be a field one of the two settings classes reads,
# except these, which the image itself uses (the Docker HEALTHCHECK).
IMAGE_ONLY_ENV = {"LESA_HEALTHCHECK_URL"}
SETTINGS_ENV = {f"LESA_{name.upper()}" for name in (*Settings.model_fields, *RedisQueueSettings.model_fields)}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing: `apt-get install prometheus` (.ci/run does)"
)


class _ComposeLoader(yaml.SafeLoader):
    """Compose's `!reset` / `!override` tags (override files) parse as plain values."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_object(node))


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - safe loader subclass


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def check_lesa_env(names: set[str], where: str) -> None:
    unknown = {n for n in names if n.startswith("LESA_")} - SETTINGS_ENV - IMAGE_ONLY_ENV
    assert not unknown, f"{where}: env names no settings class reads: {sorted(unknown)}"


# ---- Prometheus -----------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_config_rules_and_rule_unit_tests() -> None:
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        run = subprocess.run(["promtool", *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
        assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"


def test_prometheus_scrapes_the_ports_the_services_listen_on() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["lesa-api"]["static_configs"][0]["targets"] == [f"api:{API_PORT}"]
    (dns,) = jobs["lesa-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["port"] == WORKER_PORT
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


# ---- docker compose -------------------------------------------------------------------------


def test_compose_services_files_ports_and_env() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker", "prometheus", "grafana"}
    named_volumes = set(compose["volumes"])

    for name, service in services.items():
        if "build" in service:
            assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            # ${VAR:-default}: check the default
            source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in named_volumes, f"{name}: volume {source} not declared"
        check_lesa_env(set(service.get("environment", {})), f"compose service {name}")

    # Redis persists (AOF) on a volume; everyone points at it by its service name.
    assert "--appendonly" in services["redis"]["command"] and services["redis"]["volumes"][0].endswith(":/data")
    for name in ("api", "worker"):
        # .env settings reach the containers (compose alone only substitutes the ${...} it names:
        # LESA_API_KEYS set there left the API open)
        assert services[name]["env_file"] == [{"path": ".env", "required": False}]
        env = services[name]["environment"]
        assert env["LESA_REDIS_URL"].startswith("redis://redis:6379")
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["command"][:1] == ["serve"] and f"{API_PORT}" in services["api"]["command"]
    assert services["api"]["ports"][0].endswith(f":{API_PORT}")
    assert services["api"]["environment"]["LESA_EMBEDDED_WORKER"] == "false"
    assert services["api"]["environment"]["LESA_HEALTHCHECK_URL"] == f"http://127.0.0.1:{API_PORT}/healthz"

    # Workers: `lesa worker`, one GPU each, scalable (no fixed name or host port), metrics port
    # matching the Prometheus DNS discovery, time to finish a batch on SIGTERM.
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["environment"]["LESA_WORKER_METRICS_PORT"] == str(WORKER_PORT)
    assert worker["environment"]["LESA_HEALTHCHECK_URL"] == f"http://127.0.0.1:{WORKER_PORT}/healthz"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["stop_signal"] == "SIGTERM" and worker["stop_grace_period"]

    # Monitoring: config mounted where the command reads it; Grafana provisioned, password from env.
    prom = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    grafana = services["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()

    cpu = load_yaml(DEPLOY / "compose.cpu.yml")
    assert set(cpu["services"]) <= set(services) and cpu["services"]["worker"]["deploy"] is None
    for name in ("api", "worker"):  # its own tag: a later plain `up` on a GPU host must not run it
        assert cpu["services"][name]["image"] != services[name]["image"]
    for name, service in cpu["services"].items():
        check_lesa_env(set(service.get("environment", {})), f"compose.cpu.yml {name}")


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    (datasource,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/lesa.yml")["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/lesa-serving.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {datasource["uid"]}


def test_dashboard_json_is_generated_from_its_source() -> None:
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import dashboard
    finally:
        sys.path.pop(0)
    committed = json.loads((DEPLOY / "grafana/dashboards/lesa-serving.json").read_text())
    assert committed == dashboard.build(), "run `python deploy/grafana/dashboard.py` and commit the JSON"
    titles = {p["title"] for p in committed["panels"]}
    for needed in ("Request rate", "latency", "Queue depth", "Queue wait", "Batch size", "speed-up by level",
                   "full vs predicted", "Errors", "Workers", "Online quality", "Shadow checks", "Step time"):  # fmt: skip
        assert any(needed.lower() in t.lower() for t in titles), needed


# ---- Kubernetes -----------------------------------------------------------------------------


def test_k8s_manifests_parse_and_reference_each_other() -> None:
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), resource
    listed = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == set(kustomization["resources"]), "every manifest is applied by the kustomization"

    docs = k8s_docs()
    by_kind: dict[tuple[str, str], dict[str, Any]] = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    config = by_kind[("ConfigMap", "lesa-config")]["data"]
    check_lesa_env(set(config), "configmap")
    claims = {name for kind, name in by_kind if kind == "PersistentVolumeClaim"}

    for (kind, name), doc in by_kind.items():
        if kind not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), name
        for container in pod["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None:
                    assert port in ports, f"{name}: {probe} uses unknown port {port}"
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in by_kind
            check_lesa_env({e["name"] for e in container.get("env", [])}, f"{kind} {name}")
        for volume in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims

    # Services select pods that exist and target their named ports.
    pods = {n: d["spec"]["template"] for (k, n), d in by_kind.items() if k in ("Deployment", "StatefulSet")}
    for (kind, name), doc in by_kind.items():
        if kind != "Service":
            continue
        matches = [t for t in pods.values() if doc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert matches, f"service {name} selects no pod"
        port_names = {p["name"] for c in matches[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in doc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"service {name}: no port {port['targetPort']}"

    api = by_kind[("Deployment", "lesa-api")]["spec"]["template"]["spec"]["containers"][0]
    assert api["args"][0] == "serve" and api["ports"][0]["containerPort"] == API_PORT
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert any(e["name"] == "LESA_EMBEDDED_WORKER" and e["value"] == "false" for e in api["env"])
    # KEDA owns the worker count: replicas here would reset the pool at every `kubectl apply`
    assert "replicas" not in by_kind[("Deployment", "lesa-worker")]["spec"]
    worker_pod = by_kind[("Deployment", "lesa-worker")]["spec"]["template"]
    worker = worker_pod["spec"]["containers"][0]
    assert worker["args"] == ["worker"] and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["ports"][0]["containerPort"] == WORKER_PORT
    assert worker_pod["metadata"]["annotations"]["prometheus.io/port"] == str(WORKER_PORT)
    assert worker_pod["spec"]["terminationGracePeriodSeconds"] >= 60
    redis_url = config["LESA_REDIS_URL"]
    assert redis_url.startswith("redis://lesa-redis:6379") and ("Service", "lesa-redis") in by_kind


def test_keda_scales_workers_on_the_stream_the_queue_really_uses() -> None:
    from lesa_core.production import read_config
    from service.redis_queue import RedisJobQueue

    scaled = next(d for d in k8s_docs() if d["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "lesa-worker"
    # scaling down to the minimum (1) waits out the HPA window; cooldownPeriod only applies at 0
    assert scaled["spec"]["minReplicaCount"] >= 1 and "cooldownPeriod" not in scaled["spec"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
    config = next(d for d in k8s_docs() if d["kind"] == "ConfigMap")["data"]
    queue = RedisJobQueue("redis://unused:6379/0", prefix=config["LESA_REDIS_PREFIX"])
    # The worker Deployment sets no LESA_MODELS: it serves the models enabled everywhere, and each
    # of them needs a trigger on its own stream, or its backlog never scales the pool.
    assert "LESA_MODELS" not in config
    served = [name for name, m in read_config(REPO / "deploy" / "models.toml").models.items() if m.enabled is True]
    triggers = scaled["spec"]["triggers"]
    # every priority class has its own stream: a backlog of "high" jobs must scale the pool too
    assert sorted(t["metadata"]["stream"] for t in triggers) == sorted(s for m in served for s in queue.streams_of(m))
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    assert sorted(formula.split(" + ")) == sorted(t["name"] for t in triggers)
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["consumerGroup"] == queue.group
        assert trigger["metadata"]["address"].startswith("lesa-redis.")
        assert int(trigger["metadata"]["lagCount"]) >= 1
    # The HPA takes the largest of several metrics: the pool scales on the sum of every served
    # model's lag instead (KEDA's scaling modifiers), one worker per full batch.
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    names = [t["name"] for t in triggers]
    assert len(set(names)) == len(triggers) and all(re.fullmatch(r"[a-z_][a-z0-9_]*", n) for n in names)
    assert sorted(modifiers["formula"].replace(" ", "").split("+")) == sorted(names)
    assert modifiers["metricType"] == "AverageValue" and int(modifiers["target"]) == int(config["LESA_MAX_BATCH"])


# ---- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_pinned_and_healthchecked() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 4 and any("AS builder" in s for s in stages) and any("AS runtime" in s for s in stages)
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M) and re.search(r"^ARG CUDA_BASE=nvidia/cuda:", text, re.M)
    # torch pinned to the version the tests run on, installed from the matching index.
    import torch

    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    assert pinned == torch.__version__.split("+")[0]
    assert '"torch==${TORCH_VERSION}"' in text and "-c /opt/torch-constraint.txt" in text
    # Non-root at run time, health check, entry point.
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK ") and "LESA_HEALTHCHECK_URL" in line for line in lines)
    assert 'ENTRYPOINT ["lesa"]' in text
    # Every COPY from the build context exists and is not excluded by .dockerignore (last
    # matching pattern wins; `!` re-includes, as Docker applies them).
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def excluded(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!")
            parts = Path(path).parts
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
                verdict = not negate
        return verdict

    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
                assert not excluded(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    assert excluded("deploy/k8s/api.yaml") and excluded(".venv") and not excluded("lesa_models")
    env_names = set(re.findall(r"\b(LESA_[A-Z0-9_]+)=", text))
    check_lesa_env(env_names, "Dockerfile")
    assert "LESA_WEIGHTS_DIR=/models" in text and "VOLUME" in text
    # The engine reads the model list from LESA_MODELS_CONFIG; the image ships the repo's file.
    assert "COPY deploy/models.toml /etc/lesa/models.toml" in text
    assert "LESA_MODELS_CONFIG=/etc/lesa/models.toml" in text
