"""The chart's serveConfigV2 is the platform's own Serve config: each application's args pass the platform's typed
validation (what services.app:app_builder runs in Serve's build step), the document passes Ray's ServeDeploySchema,
and, with defaults filled in, it equals what `ola serve --print-serve-config` writes for the same platform config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.app import APP_NAMES, DEPLOYMENT_NAMES, SERVICER_FUNCTIONS, app_args, serve_config_document
from services.registry import RegistryConfig
from services.serve_config import PRODUCTION_CONFIG, PlatformConfig, load_config

CHART = Path(__file__).resolve().parents[2] / "helm" / "ola"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
# Keys of a deployment in the document: the name, DeploymentSpec.deployment_options() and user_config.
_DEPLOYMENT_KEYS = {
    "name",
    "max_ongoing_requests",
    "ray_actor_options",
    "graceful_shutdown_timeout_s",
    "autoscaling_config",
    "num_replicas",
    "user_config",
}


def serve_document(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (rayservice,) = [d for d in docs if d["kind"] == "RayService"]
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string"
    return yaml.safe_load(text)


def _service_spec(app: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(service, its platform config section) from one application: args' own section + the deployment options."""
    service = app["args"]["service"]
    (deployment,) = app["deployments"]
    unknown = set(deployment) - _DEPLOYMENT_KEYS
    assert not unknown, f"{app['name']}: deployment keys the platform never writes: {sorted(unknown)}"
    spec = dict(app["args"].get(service) or {})
    spec["max_ongoing_requests"] = deployment["max_ongoing_requests"]
    spec["ray_actor_options"] = deployment["ray_actor_options"]
    if "graceful_shutdown_timeout_s" in deployment:
        spec["graceful_shutdown_timeout_s"] = deployment["graceful_shutdown_timeout_s"]
    if "autoscaling_config" in deployment:
        spec["autoscaling"] = deployment["autoscaling_config"]
    if "num_replicas" in deployment:
        spec["num_replicas"] = deployment["num_replicas"]
    return service, spec


def platform_config_of(document: dict[str, Any]) -> PlatformConfig:
    """The platform config a Serve document was made from (shared sections must agree between applications)."""
    data: dict[str, Any] = {}
    for app in document["applications"]:
        service, spec = _service_spec(app)
        for section, value in app["args"].items():
            if section in ("service", service):
                continue
            assert data.setdefault(section, value) == value, f"section {section} differs in application {app['name']}"
        data[service] = spec
        models = app["deployments"][0]["user_config"]["models"]
        assert data.setdefault("models", models) == models, f"{app['name']} serves other model versions"
    return PlatformConfig.from_mapping(data, "the chart's serveConfigV2")


def canonical(document: dict[str, Any]) -> dict[str, Any]:
    """The document with the platform's defaults filled in, application by application, as Serve would build it."""
    out = copy.deepcopy(document)
    for app in out["applications"]:
        service, spec = _service_spec(app)
        args = {k: v for k, v in app["args"].items() if k != "service"}
        config = PlatformConfig.from_mapping(args, f"application {app['name']!r} args")  # what app_builder does
        assert set(args) == set(app_args(config, service)), f"{app['name']}: args sections differ from the platform's"
        app["args"] = {"service": service, **app_args(config, service)}
        options = type(config.service(service)).model_validate(spec).deployment_options()
        models = RegistryConfig.model_validate(app["deployments"][0]["user_config"]["models"])
        app["deployments"] = [
            {
                "name": app["deployments"][0]["name"],
                **options,
                "user_config": {"models": models.model_dump(mode="json")},
            }
        ]
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_is_what_ola_serve_prints_for_the_same_platform_config(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    document = serve_document(rendered[scenario])
    config = platform_config_of(document)
    assert canonical(document) == serve_config_document(config)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_passes_rays_schema(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_document(rendered[scenario]))
    assert [app.name for app in schema.applications] == list(APP_NAMES.values())
    assert schema.grpc_options.grpc_servicer_functions == SERVICER_FUNCTIONS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_platform_wiring_is_by_environment_variable(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    config = platform_config_of(serve_document(rendered[scenario]))
    assert config.cache.redis_url is None and config.cache.redis_url_env == "OLA_REDIS_URL"
    assert config.sessions.redis_url is None and config.sessions.redis_url_env == "OLA_REDIS_URL"
    store = config.object_store
    assert store.endpoint_url is None and store.endpoint_url_env == "OLA_S3_ENDPOINT_URL"
    assert (store.access_key_id_env, store.secret_access_key_env) == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert config.proxy.http_host == "0.0.0.0"  # the proxies serve other pods
    if config.rollout.model_name:
        assert config.rollout.redis_url is None and config.rollout.redis_url_env == "OLA_REDIS_URL"
    else:
        assert config.rollout.redis_url_env is None


def test_canary_routing_reads_the_rollout_state_from_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rollout = platform_config_of(serve_document(rendered["gpu-pools"])).rollout
    assert (rollout.model_name, rollout.redis_url_env, rollout.refresh_s) == ("ola", "OLA_REDIS_URL", 2)


def test_default_values_render_the_production_config(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The chart's defaults are services/configs/production.yaml; only the CPU pool pinning of tts and the gateway
    (resources cpu_pool) is the chart's own. If production.yaml changes, change helm/ola/values.yaml with it."""
    chart = canonical(serve_document(rendered["default"]))
    production = serve_config_document(load_config(PRODUCTION_CONFIG))
    assert [a["name"] for a in chart["applications"]] == list(APP_NAMES.values())
    assert [a["deployments"][0]["name"] for a in chart["applications"]] == list(DEPLOYMENT_NAMES.values())
    for app in chart["applications"]:
        if app["name"] in ("tts", "omni"):
            assert app["deployments"][0]["ray_actor_options"].pop("resources") == {"cpu_pool": 1}
    assert chart == production


def test_cpu_only_scenario_serves_the_tiny_preset_anywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    config = platform_config_of(serve_document(rendered["cpu-only"]))
    assert config.models.default_version == "tiny" and list(config.models.versions) == ["tiny"]
    for service in ("vision", "audio", "llm", "tts", "gateway"):
        spec = config.service(service)  # type: ignore[arg-type]
        assert spec.ray_actor_options.resources == {} and spec.ray_actor_options.num_gpus == 0
        assert spec.autoscaling is None and spec.num_replicas == 1
