"""The Helm chart (helm/ola): lint and render every ci/ scenario, validate the manifests offline (Kubernetes 1.33
strict schemas for the built-in kinds, the KubeRay schema for the RayService), and check the wiring: worker pools,
environment, secrets by reference only, and the values schema and template checks rejecting bad values."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "ola"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
SECRETS = {"redis": {"existingSecret": "r"}, "minio": {"existingSecret": "s"}, "postgresql": {"existingSecret": "p"}}
PLATFORM_ENV = {
    "OLA_REDIS_URL",
    "OLA_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PEPPER|ACCESS_KEY", re.IGNORECASE)


def test_scenarios_cover_what_the_chart_promises() -> None:
    assert {"default", "external-services", "gpu-pools"} <= set(SCENARIOS)


# ------------------------------------------------------------------------------------------------ lint and validate
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm: Any, scenario: str) -> None:
    result = helm("lint", "--strict", CHART, "-f", CHART / "ci" / f"{scenario}-values.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_builtin_kinds_validate_strictly_against_kubernetes_1_33(
    rendered: dict[str, list[dict[str, Any]]], scenario: str, tmp_path: Path
) -> None:
    docs = [d for d in rendered[scenario] if d["apiVersion"] != "ray.io/v1"]
    assert docs, "every scenario renders at least the pipeline API's Service"
    path = tmp_path / f"{scenario}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "-k", "1.33.0", "--strict", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(docs), proc.stdout


def test_strict_validation_catches_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The check above is not vacuous: a wrong field name in a rendered StatefulSet fails it."""
    sts = copy.deepcopy(next(d for d in rendered["default"] if d["kind"] == "StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sts))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "-k", "1.33.0", "--strict", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "imagePolicy" in proc.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rayservice_validates_against_the_kuberay_schema(
    rendered: dict[str, list[dict[str, Any]]], rayservice_validator: Any, kube: Any, scenario: str
) -> None:
    (rayservice,) = kube.by_kind(rendered[scenario], "RayService")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in rayservice_validator.iter_errors(rayservice)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplica"], 1),  # misspelt KubeRay field
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"], 0),  # not a string
        (["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "imagePolicy"], "x"),
        (["spec", "serveConfig"], "{}"),  # the pre-v1 single-app field
    ],
)
def test_kuberay_schema_rejects_wrong_fields(
    rendered: dict[str, list[dict[str, Any]]], rayservice_validator: Any, kube: Any, path: list, value: Any
) -> None:
    bad = copy.deepcopy(kube.by_kind(rendered["default"], "RayService")[0])
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert not rayservice_validator.is_valid(bad)


# ------------------------------------------------------------------------------------------------ Ray cluster layout
def _pool_param(value: str) -> dict[str, float]:
    """Parse rayStartParams.resources as KubeRay passes it to `ray start --resources`: "{\\"x\\": 1}" in quotes."""
    assert value.startswith('"') and value.endswith('"'), value
    return json.loads(value[1:-1].replace('\\"', '"'))


def _quantity(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_worker_groups_advertise_the_pools_the_serve_apps_ask_for(
    rendered: dict[str, list[dict[str, Any]]], kube: Any, scenario: str
) -> None:
    (rayservice,) = kube.by_kind(rendered[scenario], "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}
    advertised = {}
    for name, group in groups.items():
        resources = _pool_param(group["rayStartParams"]["resources"])
        assert resources == {f"{name}_pool": resources[f"{name}_pool"]}
        advertised[f"{name}_pool"] = group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for app in serve["applications"]:
        (deployment,) = app["deployments"]
        actor = deployment["ray_actor_options"]
        for resource, amount in actor.get("resources", {}).items():
            group = advertised.get(resource)
            assert group is not None, f"{app['name']} asks for {resource}, which no worker group advertises"
            slots = _pool_param(group["rayStartParams"]["resources"])[resource] / amount
            container = group["template"]["spec"]["containers"][0]
            limits = container["resources"]["limits"]
            gpus = float(limits.get("nvidia.com/gpu", 0))
            assert actor["num_gpus"] * slots <= gpus, f"{app['name']}: {slots} replicas per pod need more GPUs"
            assert actor["num_cpus"] * slots <= _quantity(limits["cpu"]), f"{app['name']}: pods are short of CPUs"
            most = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas"))
            assert most <= group["maxReplicas"] * slots, f"{app['name']}: {most} replicas cannot all be placed"


def test_gpu_pools_scenario_selects_nodes_and_limits_gpus(rendered: dict[str, list[dict[str, Any]]], kube: Any) -> None:
    values = yaml.safe_load((CHART / "ci" / "gpu-pools-values.yaml").read_text())
    (rayservice,) = kube.by_kind(rendered["gpu-pools"], "RayService")
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == set(values["workerGroups"])
    for name, expected in values["workerGroups"].items():
        group = groups[name]
        spec = group["template"]["spec"]
        assert spec.get("nodeSelector") == expected["nodeSelector"]
        assert spec.get("tolerations", []) == expected.get("tolerations", [])
        (replicas, low, high) = (group["replicas"], group["minReplicas"], group["maxReplicas"])
        assert (replicas, low, high) == (expected["replicas"], expected["minReplicas"], expected["maxReplicas"])
        limits = spec["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (str(expected["gpus"]) if expected["gpus"] else None)
    assert _pool_param(groups["audio"]["rayStartParams"]["resources"]) == {"audio_pool": 2}
    assert _pool_param(groups["llm"]["rayStartParams"]["resources"]) == {"llm_pool": 1}
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_head_runs_the_grpc_proxy_and_the_pipeline_api(rendered: dict[str, list[dict[str, Any]]], kube: Any) -> None:
    docs = rendered["default"]
    (rayservice,) = kube.by_kind(docs, "RayService")
    containers = kube.ray_containers(rayservice)
    head, api = containers["head/ray-head"], containers["head/api"]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["grpc"] == 9000
    assert api["command"] == ["ola"] and api["args"][:2] == ["api", "serve"]
    assert api["args"][api["args"].index("--port") + 1] == "50051"
    assert api["readinessProbe"]["grpc"]["port"] == 50051
    serve_service = rayservice["spec"]["serveService"]
    assert {p["name"]: p["port"] for p in serve_service["spec"]["ports"]} == {"grpc": 9000, "serve": 8000}
    (api_service,) = [s for s in kube.by_kind(docs, "Service") if s["metadata"]["name"] == "ola-api"]
    assert api_service["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "api", "protocol": "TCP"}]
    head_labels = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert api_service["spec"]["selector"].items() <= head_labels.items()


# ------------------------------------------------------------------------------------------------ environment
def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_ray_container_gets_the_same_platform_environment(
    rendered: dict[str, list[dict[str, Any]]], kube: Any, scenario: str
) -> None:
    (rayservice,) = kube.by_kind(rendered[scenario], "RayService")
    envs = {name: _env(c) for name, c in kube.ray_containers(rayservice).items()}
    reference = envs["head/ray-head"]
    assert {"OLA_REDIS_URL", "MLFLOW_TRACKING_URI"} <= set(reference)
    for name, env in envs.items():
        assert {k: v for k, v in env.items() if k != "OLA_API_KEY_PEPPER"} == reference, name


def test_default_wiring_points_at_the_bundled_services(rendered: dict[str, list[dict[str, Any]]], kube: Any) -> None:
    (rayservice,) = kube.by_kind(rendered["default"], "RayService")
    env = _env(kube.ray_containers(rayservice)["head/ray-head"])
    assert PLATFORM_ENV <= set(env)
    assert env["OLA_REDIS_URL"]["value"] == "redis://:$(OLA_REDIS_PASSWORD)@ola-redis:6379/0"
    assert env["OLA_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ola-redis", "key": "redis-password"}
    assert env["OLA_S3_ENDPOINT_URL"]["value"] == env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://ola-minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "ola-s3", "key": "access-key-id"}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://ola-mlflow:5000"
    services = {s["metadata"]["name"]: s for s in kube.by_kind(rendered["default"], "Service")}
    assert {"ola-redis", "ola-minio", "ola-mlflow", "ola-postgresql"} <= set(services)
    assert {p["port"] for p in services["ola-mlflow"]["spec"]["ports"]} == {5000}
    (mlflow,) = kube.by_kind(rendered["default"], "Deployment")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    uri = args[args.index("--backend-store-uri") + 1]
    assert uri == "postgresql://mlflow:$(MLFLOW_DB_PASSWORD)@ola-postgresql:5432/mlflow"
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow/"


def test_external_services_are_used_by_url_and_secret(rendered: dict[str, list[dict[str, Any]]], kube: Any) -> None:
    docs = rendered["external-services"]
    assert {d["kind"] for d in docs} == {"RayService", "Service", "Deployment"}  # MLflow bundled, nothing stateful
    (rayservice,) = kube.by_kind(docs, "RayService")
    env = _env(kube.ray_containers(rayservice)["head/ray-head"])
    assert env["OLA_REDIS_URL"]["value"] == "rediss://:$(OLA_REDIS_PASSWORD)@redis.example.internal:6380/2"
    assert env["OLA_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ola-external-redis", "key": "password"}
    assert env["OLA_S3_ENDPOINT_URL"]["value"] == "https://s3.example.internal"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
    (mlflow,) = kube.by_kind(docs, "Deployment")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    uri = args[args.index("--backend-store-uri") + 1]
    assert uri == "postgresql://ola_mlflow:$(MLFLOW_DB_PASSWORD)@postgres.example.internal:5432/ola_mlflow"
    assert args[args.index("--artifacts-destination") + 1] == "s3://ola-mlflow-prod/"

    docs = rendered["external-mlflow"]
    assert {d["kind"] for d in docs} == {"RayService", "Service"}
    env = _env(kube.ray_containers(kube.by_kind(docs, "RayService")[0])["head/ray-head"])
    assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.internal"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ola-mlflow-auth"
    assert "OLA_S3_ENDPOINT_URL" not in env and "AWS_ACCESS_KEY_ID" not in env  # AWS S3 by the pods' identity


# ------------------------------------------------------------------------------------------------ secrets
def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_is_templated_into_a_manifest(
    rendered: dict[str, list[dict[str, Any]]], kube: Any, scenario: str
) -> None:
    docs = rendered[scenario]
    assert not kube.by_kind(docs, "Secret"), "the chart references Secrets, it never creates one"
    for pod, spec in kube.pod_specs(docs).items():
        for container in _containers(spec):
            where = f"{pod}/{container['name']}"
            env = _env(container)
            from_secret = {name for name, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
            for name in env:
                if SECRET_NAME.search(name) and name != "MLFLOW_SERVER_ALLOWED_HOSTS":
                    assert name in from_secret, f"{where}: {name} must come from a secretKeyRef"
            texts = (
                [e.get("value", "") for e in env.values()] + container.get("args", []) + container.get("command", [])
            )
            for text in texts:
                for userinfo in re.findall(r"://([^/@\s]*)@", str(text)):
                    password = userinfo.partition(":")[2]
                    match = re.fullmatch(r"\$\((\w+)\)", password)
                    assert match and match.group(1) in from_secret, f"{where}: a literal credential in {text!r}"


@pytest.mark.parametrize("path", [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))], ids=lambda p: p.name)
def test_values_files_name_secrets_but_hold_none(path: Path) -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                words = {w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", str(key))}
                if words & {"password", "secret", "token", "pepper"} and not isinstance(value, dict):
                    assert key == "existingSecret" or str(key).endswith("Key"), f"{path.name}: {here} holds a secret"
                walk(value, here)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    walk(yaml.safe_load(path.read_text()), "")


# ------------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serve": {"vision": {"maxOngoingRequest": 4}}}, "maxOngoingRequest is not allowed"),
        ({"serve": {"vision": {"maxOngoingRequests": 0}}}, "serve.vision.maxOngoingRequests"),
        ({"workerGroups": {"vision": {"gpus": "two"}}}, "workerGroups.vision.gpus"),
        ({"redis": {"password": "hunter2"}}, "password is not allowed"),
        ({"redis": {"external": {"port": 70000}}}, "redis.external.port"),
        ({"serve": {"llm": {"numCpus": -1}}}, "serve.llm.numCpus"),
        ({"proxy": {"grpcPort": "9000"}}, "proxy.grpcPort"),
        ({"minio": {"buckets": {"media": "Media_Bucket"}}}, "minio.buckets.media"),
        ({"workerGroups": {"vision": {"resources": {"cpu": "four", "memory": "1Gi"}}}}, "cpu"),
        ({"serve": {"llm": {"settings": {"num_replicas": 3}}}}, "serve.llm.settings"),
    ],
)
def test_values_schema_rejects_bad_values(render: Any, values: dict[str, Any], message: str) -> None:
    result = render("default", values)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis": {"existingSecret": ""}}, "redis.existingSecret is required for the bundled Redis"),
        ({"minio": {"existingSecret": ""}}, "minio.existingSecret is required for the bundled MinIO"),
        ({"postgresql": {"existingSecret": ""}}, "postgresql.existingSecret is required"),
        ({"redis": {"enabled": False}}, "redis.external.host is required"),
        ({"mlflow": {"enabled": False}}, "mlflow.external.url is required"),
        ({"serve": {"vision": {"pool": "a100"}}}, 'serve.vision.pool "a100" is not a worker group'),
        ({"serve": {"llm": {"numGpus": 2}}}, "serve.llm.numGpus (2) is more than a pod of workerGroups.llm has"),
        (
            {"serve": {"tts": {"autoscaling": {"minReplicas": 9, "maxReplicas": 2}}}},
            "serve.tts.autoscaling.minReplicas (9) is over maxReplicas (2)",
        ),
        ({"workerGroups": {"cpu": {"replicas": 20}}}, "workerGroups.cpu: replicas (20) must be within"),
        ({"models": {"default_version": "ola-7b@4"}}, 'models.default_version "ola-7b@4" is not one of'),
    ],
)
def test_template_checks_fail_with_the_value_named(render: Any, values: dict[str, Any], message: str) -> None:
    result = render("default", values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_chart_packages_and_the_package_renders(helm: Any, tmp_path: Path) -> None:
    packaged = helm("package", CHART, "--destination", tmp_path)
    assert packaged.returncode == 0, packaged.stderr
    (archive,) = tmp_path.glob("ola-*.tgz")
    result = helm("template", "ola", archive, "-f", CHART / "ci" / "default-values.yaml")
    assert result.returncode == 0, result.stderr
    assert {d["kind"] for d in result.docs()} >= {"RayService", "StatefulSet", "Deployment", "Service", "Job"}


def test_install_without_secrets_fails_before_rendering_anything(render: Any) -> None:
    result = render(None)
    assert result.returncode != 0 and "existingSecret is required" in result.stderr
    assert render(None, SECRETS).returncode == 0


def test_fullname_follows_release_and_overrides(render: Any, kube: Any) -> None:
    docs = render(None, SECRETS, release="prod").docs()
    (rayservice,) = kube.by_kind(docs, "RayService")
    assert rayservice["metadata"]["name"] == "prod-ola"
    env = _env(kube.ray_containers(rayservice)["head/ray-head"])
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://prod-ola-mlflow:5000"
    docs = render(None, SECRETS, {"fullnameOverride": "demo"}, release="x").docs()
    names = {d["metadata"]["name"] for d in docs}
    assert {"demo", "demo-redis", "demo-minio", "demo-postgresql", "demo-mlflow", "demo-api"} <= names
