"""``ola api serve --deploy``: the rollout controllers the API server runs bring versions up and down through a
:class:`DeployingController`. The server starts on a real Redis and wires a KubeRayDeployer to a Kubernetes API on
loopback (a small HTTP server answering the RayService GET as the API server does), reached through a kubeconfig
file as an operator would give it; the CLI's option checks name the option that is missing."""

from __future__ import annotations

import argparse
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from workflows.api.cli import cmd_serve, deploy_config, register
from workflows.api.model_service import DeployConfig, ModelServiceConfig
from workflows.api.server import ApiServer, ServerConfig
from workflows.lifecycle.deploy import DeployError, DeployingController, KubeRayDeployer, ServeDeployer
from workflows.lifecycle.rollout import RolloutController

REPO = Path(__file__).resolve().parents[2]
NS, NAME = "ml", "ola-svc"
PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}"


def _rayservice() -> dict:
    """A RayService whose two applications serve versions ``ola@3`` (default) and ``ola@4``."""
    models = {
        "versions": {"ola@3": {"preset": "tiny"}, "ola@4": {"preset": "tiny"}},
        "default_version": "ola@3",
    }
    serve_config = {
        "applications": [
            {"name": name, "deployments": [{"name": name.upper(), "user_config": {"models": models}}]}
            for name in ("llm", "omni")
        ]
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME, "namespace": NS, "resourceVersion": "1", "generation": 1},
        "spec": {"serveConfigV2": yaml.safe_dump(serve_config)},
    }


class _KubeApi(BaseHTTPRequestHandler):
    """GET of the one RayService; 404 with a Status body for anything else. Records the paths it was asked for."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path.split("?")[0])
        if self.path.split("?")[0] == PATH:
            self._send(200, _rayservice())
        else:
            self._send(
                404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
            )

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kube_api(tmp_path) -> Iterator[tuple[str, Path]]:
    """A Kubernetes API on loopback and a kubeconfig file pointing at it: ``(server URL, kubeconfig path)``."""
    _KubeApi.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _KubeApi)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "loop", "cluster": {"server": url}}],
                "users": [{"name": "ci", "user": {"token": "t"}}],
                "contexts": [{"name": "loop", "context": {"cluster": "loop", "user": "ci", "namespace": NS}}],
                "current-context": "loop",
            }
        )
    )
    try:
        yield url, kubeconfig
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ola")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["api", "serve", *argv])


# ------------------------------------------------------------------------------------------------ the server
def test_api_server_runs_deploying_controllers_against_a_rayservice(loop, redis_url, kube_api, tmp_path) -> None:
    url, kubeconfig = kube_api
    args = _args(
        [
            *("--deploy", "kuberay", "--rayservice", NAME, "--namespace", NS, "--kubeconfig", str(kubeconfig)),
            *("--models-root", str(tmp_path / "models"), "--served-root", "/mnt/models", "--keep-previous", "60"),
        ]
    )
    deploy = deploy_config(args)
    assert deploy == DeployConfig(
        kind="kuberay",
        rayservice=NAME,
        namespace=NS,
        kubeconfig=kubeconfig,
        models_root=(tmp_path / "models").resolve(),
        served_root="/mnt/models",
        keep_previous_s=60.0,
    )
    models = ModelServiceConfig(tracking_uri="http://127.0.0.1:9", rollout_prefix=f"t-{uuid.uuid4().hex[:8]}:")
    models.deploy = deploy
    server = ApiServer(
        ServerConfig(
            redis_url=redis_url, runs_root=tmp_path / "runs", port=0, prefix=f"t-{uuid.uuid4().hex[:8]}:", models=models
        )
    )
    loop.run(server.start())
    try:
        ctl = server.model_servicer.controller("ola")
        assert isinstance(ctl, DeployingController) and ctl is server.model_servicer.controller("ola")
        assert isinstance(ctl.controller, RolloutController) and ctl.model_name == "ola"
        assert ctl.controller.prefix == models.rollout_prefix and ctl.keep_previous_s == 60.0
        deployer = ctl.deployer
        assert isinstance(deployer, KubeRayDeployer) and (deployer.namespace, deployer.name) == (NS, NAME)
        assert deployer.api.api_client.configuration.host == url
        # the deployer really reads the RayService through the loopback API
        assert deployer.served_versions() == ["ola@3", "ola@4"] and deployer.default_version() == "ola@3"
        assert _KubeApi.seen and set(_KubeApi.seen) == {PATH}
        # registered versions are served from the models root as the pods mount it; a present one is not fetched
        (tmp_path / "models" / "ola-4").mkdir(parents=True)
        assert ctl.source_of("4") == "/mnt/models/ola-4"
        assert server.model_servicer.controller("other").deployer is deployer  # one deployer, one controller each
    finally:
        loop.run(server.stop(0))


def test_without_deploy_the_controller_only_moves_traffic(loop, redis_url, tmp_path) -> None:
    assert deploy_config(_args([])) is None
    models = ModelServiceConfig(tracking_uri="http://127.0.0.1:9", deploy=DeployConfig(kind="none"))
    server = ApiServer(ServerConfig(redis_url=redis_url, runs_root=tmp_path / "runs", port=0, models=models))
    loop.run(server.start())
    try:
        assert server.model_servicer.deployer is None
        assert type(server.model_servicer.controller("ola")) is RolloutController
    finally:
        loop.run(server.stop(0))


def test_serve_deploy_builds_a_serve_deployer_for_the_platform_config() -> None:
    platform = REPO / "services" / "configs" / "local.yaml"
    deploy = deploy_config(_args(["--deploy", "serve", "--serve-config", str(platform), "--deploy-timeout", "30"]))
    deployer = deploy.make_deployer()
    assert isinstance(deployer, ServeDeployer) and deployer.timeout_s == 30.0
    assert deployer.grpc_address == f"127.0.0.1:{deployer.config.proxy.grpc_port}"


# ------------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--deploy", "kuberay"], "--rayservice: the RayService name is required with --deploy kuberay"),
        (["--deploy", "serve"], "--serve-config: the platform YAML `ola serve` runs is required"),
        (
            ["--deploy", "kuberay", "--rayservice", NAME, "--no-models"],
            "--deploy kuberay: needs the ModelService (drop --no-models)",
        ),
    ],
)
def test_missing_deploy_options_are_refused_before_anything_starts(argv, message, capsys) -> None:
    with pytest.raises(ValueError) as err:
        deploy_config(_args(argv))
    assert str(err.value).startswith(message)
    assert cmd_serve(_args(argv)) == 2
    assert message in capsys.readouterr().err


def test_deploy_config_checks_its_fields(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^deploy: must be one of none, serve, kuberay, got 'k8s'"):
        DeployConfig(kind="k8s")
    with pytest.raises(ValueError, match=r"^rayservice: "):
        DeployConfig(kind="kuberay", rayservice=" ")
    with pytest.raises(ValueError, match=r"^keep_previous_s: must be >= 0"):
        DeployConfig(kind="kuberay", rayservice=NAME, keep_previous_s=-1)
    with pytest.raises(ValueError, match=r"^timeout_s: must be > 0"):
        DeployConfig(kind="serve", serve_config=tmp_path / "p.yaml", timeout_s=0)
    missing = tmp_path / "no-such-kubeconfig"
    with pytest.raises(DeployError, match=r"^kubeconfig: cannot load .*no-such-kubeconfig"):
        DeployConfig(kind="kuberay", rayservice=NAME, kubeconfig=missing).make_deployer()


def test_probe_gateway_gives_the_controller_the_policy_probes_through_the_gateway(loop, redis_url, tmp_path) -> None:
    """``--probe-gateway``: the canary's quality probes are asked through the omni gateway, the version pinned."""
    from services.rollout import OmniProbe

    args = _args(["--probe-gateway", "127.0.0.1:9000"])
    assert args.probe_gateway == "127.0.0.1:9000"
    models = ModelServiceConfig(tracking_uri="http://127.0.0.1:9", probe_gateway=args.probe_gateway)
    server = ApiServer(ServerConfig(redis_url=redis_url, runs_root=tmp_path / "runs", port=0, models=models))
    loop.run(server.start())
    try:
        probe = server.model_servicer.controller("ola").probe
        assert isinstance(probe, OmniProbe) and probe.target == "127.0.0.1:9000"
        assert probe.probes == server.model_servicer.policy.probe_set and probe.probes  # the shipped probes
        assert probe.metadata == (("application", "omni"),)  # through Serve's gRPC proxy
        # nothing answers at that address: every probe counts wrong, which is what a dead challenger must score
        probe.timeout_s = 2.0
        assert probe("ola@1") == 0.0
    finally:
        loop.run(server.stop(0))
    plain = ApiServer(
        ServerConfig(
            redis_url=redis_url,
            runs_root=tmp_path / "runs2",
            port=0,
            models=ModelServiceConfig(tracking_uri="http://127.0.0.1:9"),
        )
    )
    loop.run(plain.start())
    try:
        assert plain.model_servicer.controller("ola").probe is None  # no gateway: probes skipped, as the audit says
    finally:
        loop.run(plain.stop(0))
