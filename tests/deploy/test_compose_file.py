"""docker-compose.yml: valid against the Compose Specification's JSON schema, wired with the chart's environment
names, every credential from .env (documented in .env.example), start order by health, and a platform config the
platform accepts."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.serve_config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
PLATFORM_SERVICES = ("ray-head", "api")
# ${NAME}, ${NAME:-default}, ${NAME:?message}; $$ escapes a literal $ for the container's shell.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any], compose_validator: Any) -> None:
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in compose_validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_compose_schema_catches_a_misspelt_key(compose: dict[str, Any], compose_validator: Any) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["redis"]["helthcheck"] = bad["services"]["redis"].pop("healthcheck")
    assert not compose_validator.is_valid(bad)


def test_platform_services_get_the_charts_environment(
    compose: dict[str, Any], rendered: dict[str, list[dict[str, Any]]], kube: Any
) -> None:
    (rayservice,) = kube.by_kind(rendered["default"], "RayService")
    chart = {e["name"] for e in kube.ray_containers(rayservice)["head/ray-head"]["env"]}
    chart.discard("OLA_REDIS_PASSWORD")  # the chart's way of putting the password into OLA_REDIS_URL
    for name in PLATFORM_SERVICES:
        env = _env(compose["services"][name])
        assert chart <= set(env), f"{name} lacks {sorted(chart - set(env))}"
        assert env["OLA_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD") and env["OLA_REDIS_URL"].endswith(
            "@redis:6379/0"
        )
        assert env["OLA_S3_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    (mlflow_chart,) = kube.by_kind(rendered["default"], "Deployment")
    chart_mlflow = {e["name"] for e in mlflow_chart["spec"]["template"]["spec"]["containers"][0]["env"]}
    chart_mlflow.discard("MLFLOW_DB_PASSWORD")  # compose puts the password into the URI from .env
    assert chart_mlflow <= set(_env(compose["services"]["mlflow"]))


def test_the_platform_config_reads_what_compose_sets(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["ray-head"]["command"])
    config_path = re.search(r"ola serve .*--config (\S+)", command).group(1)
    config = load_config(REPO / config_path)
    env = _env(compose["services"]["ray-head"])
    store = config.object_store
    named = {config.cache.redis_url_env, config.sessions.redis_url_env, store.endpoint_url_env}
    named |= {store.access_key_id_env, store.secret_access_key_env}
    assert None not in named and named <= set(env)
    assert config.proxy.grpc_port == 9000 and config.proxy.http_host == "0.0.0.0"
    assert "127.0.0.1:9000:9000" in compose["services"]["ray-head"]["ports"]


def test_mlflow_uses_postgres_and_minio(compose: dict[str, Any]) -> None:
    args = compose["services"]["mlflow"]["command"]
    assert args[:2] == ["mlflow", "server"]
    backend = args[args.index("--backend-store-uri") + 1]
    assert re.fullmatch(r"postgresql://mlflow:\$\{POSTGRES_PASSWORD:\?[^}]+\}@postgres:5432/mlflow", backend)
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow/"
    init = " ".join(compose["services"]["minio-init"]["entrypoint"])
    assert "mc mb --ignore-existing" in init and "ola/mlflow" in init and "ola/media" in init


def test_every_service_waits_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name != "minio-init":
            assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if dependency == "minio-init" else "service_healthy"
            assert rule == {"condition": expected}, f"{name} -> {dependency}"
    assert set(services["api"]["depends_on"]) >= {"ray-head", "redis", "mlflow"}
    assert set(services["ray-head"]["depends_on"]) >= {"redis", "minio-init", "mlflow"}
    assert set(services["mlflow"]["depends_on"]) >= {"postgres", "minio-init"}


def _strings(node: Any) -> list[str]:
    """Every string (keys excluded) in the parsed file: what Compose substitutes variables in."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def test_credentials_come_only_from_dotenv(compose: dict[str, Any]) -> None:
    used = {m.group(1): m.group(2) for text in _strings(compose) for m in VARIABLE.finditer(text)}
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    secrets = {"S3_SECRET_ACCESS_KEY", "REDIS_PASSWORD", "POSTGRES_PASSWORD", "OLA_API_KEY_PEPPER"}
    assert secrets <= set(used), "the passwords are substituted from .env"
    required = {name for name, kind in used.items() if kind == "?"}
    assert required <= set(example), f".env.example misses {sorted(required - set(example))}"
    assert all(not example[name] for name in secrets), ".env.example must not carry passwords"
    # No credential literal anywhere: every password-like setting is a substitution.
    for service in compose["services"].values():
        for key, value in _env(service).items():
            if re.search(r"PASSWORD|SECRET|PEPPER", key):
                assert VARIABLE.fullmatch(value), f"{key} is not substituted from .env"
    assert re.search(r"^\.env$", (REPO / ".gitignore").read_text(), re.MULTILINE), ".env must be git-ignored"


def test_published_ports_bind_to_loopback(compose: dict[str, Any]) -> None:
    ports = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)
