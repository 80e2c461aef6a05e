"""ServeDeployer: the platform config it deploys to a local Ray Serve (fast, no Ray), and the whole round trip on a
real Ray Serve with the gRPC proxy (``slow``: starting Serve with five applications takes longer than the fast suite
allows on two cores).

The config-level tests check what Serve is handed: the changed ``models`` in every application's ``user_config`` and
nothing else, so the deployments keep their pinned versions and Serve updates the running replicas in place.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from workflows.lifecycle.deploy import DeployError, ServeDeployer

V1, V2 = "tiny@1", "tiny@2"


def _config(grpc_port: int = 9000, http_port: int = 8000):
    from services.serve_config import PlatformConfig

    cpu = lambda n: {"num_cpus": n}
    return PlatformConfig.from_mapping(
        {
            "models": {"versions": {V1: {"preset": "tiny", "seed": 0}}, "default_version": V1},
            "vision": {"ray_actor_options": cpu(0.25)},
            "audio": {"ray_actor_options": cpu(0.25)},
            "llm": {"max_batch": 2, "ray_actor_options": cpu(0.25)},
            "tts": {"sample_rate": 16000, "ray_actor_options": cpu(0.1)},
            "gateway": {"sentence_min_chars": 1, "ray_actor_options": cpu(0.1)},
            "proxy": {"grpc_port": grpc_port, "http_port": http_port},
        },
        "test",
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model, tiny_tok) -> Path:
    from ola_model.checkpoint.ola_format import save_checkpoint

    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("serve-deployer") / "tiny-2", tokenizer=tiny_tok)


def test_the_deployed_config_changes_only_the_models(checkpoint):
    from services.app import _deployment_version, app_args, serve_config_document

    config = _config()
    deployer = ServeDeployer(config)
    assert deployer.served_versions() == [V1] and deployer.default_version() == V1

    added = deployer.config_with_version(V2, checkpoint)
    before, after = serve_config_document(config), serve_config_document(added)
    for app_before, app_after in zip(before["applications"], after["applications"], strict=True):
        (dep_before,), (dep_after,) = app_before["deployments"], app_after["deployments"]
        models = dep_after["user_config"]["models"]
        assert models["default_version"] == V1 and list(models["versions"]) == [V1, V2]
        assert models["versions"][V2]["checkpoint"] == str(checkpoint)
        dep_after["user_config"] = dep_before["user_config"]
    assert after == before  # nothing but the models moved
    for service in ("vision", "audio", "llm", "tts", "gateway"):  # same replicas: Serve reconfigures them in place
        versions = [_deployment_version(service, app_args(c, service)) for c in (config, added)]
        assert versions[0] == versions[1]

    deployer.config = added  # as if deployed
    assert deployer.config_with_version(V2, checkpoint) is None  # served already: no deploy
    assert deployer.config_with_version(V2, {"checkpoint": str(checkpoint), "device": "cpu"}) is None
    with pytest.raises(DeployError, match="it is the default version"):
        deployer.config_without_version(V1)
    switched = deployer.config_with_default(V2)
    assert switched.models.default_version == V2
    deployer.config = switched
    removed = deployer.config_without_version(V1)
    assert list(removed.models.versions) == [V2] and removed.models.default_version == V2


def test_sources_a_local_serve_cannot_load_are_refused(tmp_path, checkpoint):
    deployer = ServeDeployer(_config())
    with pytest.raises(DeployError, match="not a checkpoint directory"):
        deployer.config_with_version(V2, tmp_path)  # exists, but holds no checkpoint
    with pytest.raises(DeployError, match="not a checkpoint directory"):
        deployer.config_with_version(V2, tmp_path / "missing")
    with pytest.raises(DeployError, match="must be an absolute directory"):
        deployer.config_with_version(V2, "tiny-2")
    with pytest.raises(DeployError, match="cannot make 'tiny@9' the default: it is not served"):
        deployer.config_with_default("tiny@9")
    assert deployer.config_with_version(V2, f"file://{checkpoint}").models.versions[V2].checkpoint == checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_version_comes_up_and_goes_away_on_a_running_serve(checkpoint):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from services import app
    from services.client import OlaClient
    from services.gen.ola.common.v1 import sampling_pb2

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        config = _config(_free_port(), _free_port())
        app.deploy(config)
        address = f"127.0.0.1:{config.proxy.grpc_port}"
        with OlaClient(address, timeout=120) as client:
            client.wait_ready(timeout=120)
            llm_before = serve.get_app_handle("llm").replica_info.remote().result(timeout_s=60)
            deployer = ServeDeployer(config, grpc_address=address, timeout_s=120)

            start = time.monotonic()
            deployer.ensure_version(V2, checkpoint)
            print(f"{V2} up in {time.monotonic() - start:.1f} s")
            assert all(V2 in loaded for loaded in deployer.replica_versions())
            greedy = sampling_pb2.SamplingParams(temperature=0.0, max_new_tokens=3)
            answer = client.ask("Hello", model_version=V2, sampling=greedy)
            assert answer.model_version == V2 and answer.usage.completion_tokens >= 1
            llm = serve.get_app_handle("llm").replica_info.remote().result(timeout_s=60)
            assert llm["actor_id"] == llm_before["actor_id"]  # the same replica, reconfigured in place

            deployer.remove_version(V2)
            assert [v.model_version for v in client.list_model_versions().versions] == [V1]
            assert all(loaded == [V1] for loaded in deployer.replica_versions())
            assert client.ask("Hello", sampling=greedy).model_version == V1
    finally:
        serve.shutdown()
        ray.shutdown()
