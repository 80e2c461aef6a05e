"""The platform config: every shipped YAML validates, bad configs fail naming the field, builders need no cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.serve_config import (
    CONFIG_DIR,
    LOCAL_CONFIG,
    PRODUCTION_CONFIG,
    ConfigError,
    PlatformConfig,
    load_config,
)

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates(path: Path):
    config = load_config(path)
    assert config.models.default_version in config.models.versions
    for name in ("vision", "audio", "llm", "tts", "gateway"):
        options = config.service(name).deployment_options()
        assert ("num_replicas" in options) != ("autoscaling_config" in options)
        assert options["max_ongoing_requests"] >= 1


def test_the_embedded_default_is_local_cpu_demo_model_without_redis():
    assert {p.name for p in SHIPPED} >= {"local.yaml", "production.yaml"}
    config = load_config()  # no path: local.yaml
    assert config == load_config(LOCAL_CONFIG)
    assert [s.builtin for s in config.models.versions.values()] == ["demo"]
    assert config.cache.resolve(environ={}).redis_url is None and config.sessions.url(environ={}) is None
    total_cpus = 0.0
    for name in ("vision", "audio", "llm", "tts", "gateway"):
        spec = config.service(name)
        assert spec.ray_actor_options.num_gpus == 0 and not spec.ray_actor_options.resources
        total_cpus += spec.ray_actor_options.num_cpus * (spec.num_replicas or 1)
    assert total_cpus <= 2  # fits a 2-core machine
    # the config is the defaults made explicit: an empty file means the same platform
    assert PlatformConfig().models == config.models


def test_production_puts_models_on_gpu_pools_and_keeps_secrets_out():
    config = load_config(PRODUCTION_CONFIG)
    for name, pool in (("vision", "vision_pool"), ("audio", "audio_pool"), ("llm", "llm_pool")):
        spec = config.service(name)
        assert spec.ray_actor_options.num_gpus > 0 and spec.ray_actor_options.resources == {pool: 1}
        assert spec.device == "cuda" and spec.autoscaling is not None
    assert config.tts.ray_actor_options.num_gpus == 0
    env = {
        "OLA_REDIS_URL": "redis://:pw@redis:6379/0",
        "AWS_ACCESS_KEY_ID": "ak",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
    }
    assert config.cache.resolve(environ=env).redis_url == env["OLA_REDIS_URL"]
    assert config.sessions.url(environ=env) == env["OLA_REDIS_URL"]
    s3 = config.object_store.s3_config(environ={**env, "OLA_S3_ENDPOINT_URL": "http://minio:9000"})
    assert s3.endpoint_url == "http://minio:9000" and s3.secret_access_key.get_secret_value() == "s3cr3t-value"
    for key, value in _leaves(yaml.safe_load(PRODUCTION_CONFIG.read_text())):
        if any(word in key for word in ("secret", "password", "access_key")):
            assert key.endswith("_env"), f"{key}: secrets only by env var name"
        assert not (isinstance(value, str) and "://" in value and "@" in value), f"{key}: credentials in a URL"
    dumped = config.to_plain()
    assert dumped["cache"]["redis_url"] is None and "s3cr3t" not in str(dumped)  # nothing secret reaches Serve


def _leaves(node, key: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v, key)
    else:
        yield key, node


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        PlatformConfig.from_mapping(data, "bad.yaml")
    return str(err.value)


def test_bad_configs_name_the_field():
    assert "bad.yaml" in _error({"visoin": {}}) and "visoin: unknown key" in _error({"visoin": {}})
    assert "vision.ray_actor_options.num_cpu: unknown key" in _error({"vision": {"ray_actor_options": {"num_cpu": 1}}})
    msg = _error({"vision": {"num_replicas": -1}})
    assert "vision.num_replicas" in msg and "greater than or equal to 1" in msg
    msg = _error({"llm": {"ray_actor_options": {"num_gpus": -0.5}}})
    assert "llm.ray_actor_options.num_gpus" in msg
    msg = _error({"models": {"versions": {"a": {"preset": "tiny"}}, "default_version": "b"}})
    assert "models" in msg and "default_version 'b' is not in versions ['a']" in msg
    assert "either num_replicas or autoscaling" in _error(
        {"llm": {"num_replicas": 2, "autoscaling": {"max_replicas": 3}}}
    )
    assert "min_replicas (3) is over max_replicas (2)" in _error(
        {"audio": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}
    )
    assert "tts" in _error({"tts": {"sample_rate": 1000}}) and "sample_rate" in _error({"tts": {"sample_rate": 1000}})
    assert "shared sessions" in _error({"gateway": {"num_replicas": 2}})
    assert "proxy.grpc_port" in _error({"proxy": {"grpc_port": 70000}})
    # several errors are reported together
    assert "(2 errors)" in _error({"vision": {"num_replicas": 0}, "llm": {"max_batch": 0}})


def test_yaml_problems_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_checkpoints_resolve_against_the_file_and_the_cli_option(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "p.yaml"
    path.write_text(yaml.safe_dump({"models": {"versions": {"v1": {"checkpoint": "../ckpt"}}}}))
    config = load_config(path)
    assert config.models.versions["v1"].checkpoint == (tmp_path / "ckpt").resolve()
    assert config.models.default_version == "v1"
    local = load_config().with_checkpoint(tmp_path / "other", "mine")
    assert list(local.models.versions) == ["mine"] and local.models.default_version == "mine"
    assert local.models.versions["mine"].checkpoint == (tmp_path / "other").resolve()


def test_deployment_options_and_device_override():
    config = PlatformConfig.from_mapping(
        {
            "vision": {
                "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4},
                "max_ongoing_requests": 12,
                "device": "cuda:1",
                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5, "resources": {"vision_pool": 1}},
            },
            "tts": {"sample_rate": 16000},
        }
    )
    options = config.vision.deployment_options()
    assert options["autoscaling_config"]["max_replicas"] == 3 and options["max_ongoing_requests"] == 12
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.5, "resources": {"vision_pool": 1}}
    assert {s.device for s in config.vision.registry(config.models).versions.values()} == {"cuda:1"}
    assert config.llm.registry(config.models) == config.models  # no override: as each version says
    assert config.gateway.speech_sample_rate_hz == 16000  # the gateway speaks at the TTS rate unless told


def test_builders_validate_first_and_pin_replica_identity():
    from services.app import APP_NAMES, app_args, build_apps

    apps = build_apps(load_config())
    assert list(apps) == ["vision", "audio", "llm", "tts", "omni"] == list(APP_NAMES.values())
    with pytest.raises(ConfigError, match=r"vision\.num_replicas"):
        build_apps({"vision": {"num_replicas": 0}})
    base = load_config()
    scaled = PlatformConfig.from_mapping(
        {**base.to_plain(), "vision": {**base.to_plain()["vision"], "num_replicas": 3}}
    )
    # what a replica is built from leaves out replica counts (and model versions, which are user_config)
    assert app_args(scaled, "vision") == app_args(base, "vision")
    assert "num_replicas" not in app_args(base, "vision")["vision"] and "models" not in app_args(base, "vision")
    assert set(app_args(base, "gateway")) == {"gateway", "sessions", "rollout", "limits", "proxy", "metrics"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_the_serve_config_document_is_a_valid_serve_deploy_schema(path: Path):
    from ray.serve.schema import ServeDeploySchema

    from services.app import SERVICER_FUNCTIONS, app_builder, serve_config_document

    config = load_config(path)
    document = serve_config_document(config)
    schema = ServeDeploySchema.model_validate(document)
    assert [a.name for a in schema.applications] == ["vision", "audio", "llm", "tts", "omni"]
    assert schema.grpc_options.port == config.proxy.grpc_port
    assert schema.grpc_options.grpc_servicer_functions == SERVICER_FUNCTIONS
    llm = next(a for a in document["applications"] if a["name"] == "llm")
    assert llm["deployments"][0]["user_config"]["models"]["default_version"] == config.models.default_version
    assert app_builder(llm["args"]) is not None  # the builder accepts the arguments it is given
    with pytest.raises(ConfigError, match="max_batchh"):
        app_builder({**llm["args"], "llm": {"max_batchh": 3}})
    with pytest.raises(ValueError, match=r"args\.service"):
        app_builder({"service": "nope"})
