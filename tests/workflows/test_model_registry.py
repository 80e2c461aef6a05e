"""The MLflow model registry for stage outputs, on a real ``mlflow server`` with checkpoints in a real S3 artifact
store (moto): versions with lineage tags chained stage to stage, aliases set and moved, downloads that load, and
registration that is idempotent and never leaves a version with incomplete artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ola_model.checkpoint.ola_format import load_checkpoint
from workflows.artifacts import S3ArtifactStore
from workflows.lifecycle.errors import InvalidAlias, ModelNotFound, RegistrationError
from workflows.lifecycle.registry import ModelRegistry, code_revision, download_version, get_alias, list_versions
from workflows.training.config import load_config
from workflows.training.pipeline import run_pipeline
from workflows.training.smoke_data import write_smoke_dataset

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
NAME = "ola"


@dataclass
class Registered:
    out: Path
    config_path: Path
    uri: str
    registry: ModelRegistry
    pipeline_id: str
    data_root: Path


pytestmark = pytest.mark.usefixtures("process_group")


def vision_loss_probe(stage: str, model_dir: Path) -> dict:
    """A real (if small) evaluation: norms of the two projectors of the stage output."""
    model = load_checkpoint(model_dir)
    return {
        "mm_norm": float(model.mm_projector.proj1.weight.norm()),
        "speech_norm": float(model.speech_projector.linear1.weight.norm()),
    }


@pytest.fixture(scope="module")
def registered(mlflow_server: str, s3, s3_creds, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """A two-stage tiny pipeline run whose checkpoints go to s3://<bucket>/ola-artifacts, registered as ``ola``."""
    tmp = tmp_path_factory.mktemp("registry")
    write_smoke_dataset(tmp / "data")
    raw = {
        "name": "two-stage",
        "model": {"preset": "tiny", "seed": 0},
        "data": {"root": str(tmp / "data")},
        "defaults": {"batch_size": 2, "lr": 1e-3, "steps": 2, "save_every": 2, "max_length": 2048},
        "stages": [
            {"name": "v", "trainable": ["mm_projector"], "data": {"caption": 1.0}},
            {"name": "s", "trainable": ["speech_projector"], "data": ["asr"]},
        ],
        "tracking": {"uri": mlflow_server, "experiment": "registry-test"},
        "artifacts": {"uri": f"s3://{s3.bucket}/ola-artifacts", "endpoint_url": s3.endpoint_url},
    }
    config_path = tmp / "two-stage.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    out = tmp / "out"
    run_pipeline(load_config(config_path), out, progress=False, evaluator=vision_loss_probe)
    pipeline_id = json.loads((out / "pipeline.json").read_text())["pipeline_id"]
    registry = ModelRegistry(mlflow_server, s3_endpoint_url=s3.endpoint_url)
    return Registered(out, config_path, mlflow_server, registry, pipeline_id, tmp / "data")


def test_versions_carry_lineage_tags_and_chain(registered: Registered, s3) -> None:
    versions = registered.registry.list_versions(NAME)
    assert [v.stage for v in versions] == ["v", "s"]
    v, s = versions
    record = json.loads((registered.out / "mlflow.json").read_text())
    data_hash = hashlib.sha256((registered.data_root / "manifest.json").read_bytes()).hexdigest()
    for info, stage in ((v, "v"), (s, "s")):
        assert info.status == "READY" and info.run_id == record["stages"][stage]["run_id"]
        assert info.source == f"s3://{s3.bucket}/ola-artifacts/two-stage/{registered.pipeline_id}/{stage}/model"
        assert info.tags["pipeline_id"] == registered.pipeline_id and info.tags["config_name"] == "two-stage"
        assert info.tags["dataset_manifest_hash"] == data_hash
        assert info.tags["code_revision"] == code_revision()
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|ola-platform==.+", info.tags["code_revision"])
        report = json.loads((registered.out / "stages" / stage / "eval_report.json").read_text())
        assert info.eval_metrics == pytest.approx(report) and set(report) == {"mm_norm", "speech_norm"}
    assert v.parent_version is None and s.parent_version == v.version
    summary = json.loads((registered.out / "pipeline.json").read_text())["stages"]
    assert summary["s"]["registered"] == {"name": NAME, "version": s.version}
    assert registered.registry.find_version(NAME, pipeline_id=registered.pipeline_id, stage="s") == s
    # The module functions answer the same.
    assert [x.version for x in list_versions(NAME, tracking_uri=registered.uri)] == [v.version, s.version]


def test_aliases_set_move_and_delete(registered: Registered) -> None:
    reg = registered.registry
    v, s = reg.list_versions(NAME)
    assert reg.set_alias(NAME, "champion", v.version).aliases == ("champion",)
    reg.set_alias(NAME, "challenger", s.version)
    assert reg.get_alias(NAME, "champion").version == v.version
    assert get_alias(NAME, "challenger", tracking_uri=registered.uri).version == s.version
    # Promote: champion moves to the challenger's version; one version may hold both aliases.
    reg.set_alias(NAME, "champion", s.version)
    assert sorted(reg.get_version(NAME, s.version).aliases) == ["challenger", "champion"]
    assert reg.get_version(NAME, v.version).aliases == ()
    assert [x.aliases for x in reg.list_versions(NAME)] == [(), ("challenger", "champion")]
    reg.delete_alias(NAME, "challenger")
    with pytest.raises(ModelNotFound, match=r"model 'ola' has no alias 'challenger' \(aliases: \['champion'\]\)"):
        reg.get_alias(NAME, "challenger")
    with pytest.raises(ModelNotFound, match="has no alias 'nope'"):
        reg.download_version(NAME, "nope", registered.out / "never")
    with pytest.raises(ModelNotFound, match="model 'ola' has no version 99"):
        reg.get_version(NAME, 99)
    with pytest.raises(ModelNotFound, match="model 'no-such-model' is not registered"):
        reg.get_alias("no-such-model", "champion")
    with pytest.raises(ModelNotFound, match="model 'no-such-model' is not registered"):
        reg.list_versions("no-such-model")
    with pytest.raises(InvalidAlias, match="alias 'latest'"):
        reg.set_alias(NAME, "latest", v.version)
    with pytest.raises(ModelNotFound, match="has no version 42"):
        reg.set_alias(NAME, "champion", 42)
    assert not (registered.out / "never").exists()


def test_download_version_loads_with_load_checkpoint(registered: Registered, s3, tmp_path: Path) -> None:
    reg = registered.registry
    _, s = reg.list_versions(NAME)
    reg.set_alias(NAME, "champion", s.version)
    got = download_version(
        NAME, "champion", tmp_path / "champion", tracking_uri=registered.uri, s3_endpoint_url=s3.endpoint_url
    )
    model = load_checkpoint(got)
    want = load_checkpoint(registered.out / "stages" / "s" / "model")
    for name, tensor in want.state_dict().items():
        assert model.state_dict()[name].equal(tensor), name
    by_number = reg.download_version(NAME, s.version, tmp_path / "by-number")
    assert sorted(p.name for p in by_number.iterdir()) == sorted(p.name for p in got.iterdir())


def test_registration_is_idempotent(registered: Registered) -> None:
    reg = registered.registry
    before = [x.version for x in reg.list_versions(NAME)]
    _, s = reg.list_versions(NAME)
    again = reg.register_stage_output(
        registered.out / "stages" / "s" / "model", stage="s", pipeline_id=registered.pipeline_id, source=s.source
    )
    assert again == s.version
    # The whole pipeline again: stages skipped, nothing new registered, the summary still names the versions.
    run_pipeline(load_config(registered.config_path), registered.out, progress=False)
    assert [x.version for x in reg.list_versions(NAME)] == before
    summary = json.loads((registered.out / "pipeline.json").read_text())["stages"]
    assert summary["v"]["skipped"] and summary["v"]["registered"]["version"] == before[0]


def test_incomplete_artifacts_are_never_registered(registered: Registered, s3) -> None:
    reg = registered.registry
    before = [x.version for x in reg.list_versions(NAME)]
    model_dir = registered.out / "stages" / "s" / "model"
    # What an interrupted upload leaves: the files, no manifest.
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        s3.client.upload_file(str(path), s3.bucket, f"half/{path.relative_to(model_dir).as_posix()}")
    with pytest.raises(RegistrationError, match="not complete, not registering"):
        reg.register_stage_output(model_dir, stage="s", pipeline_id="half-uploaded", source=f"s3://{s3.bucket}/half")
    assert reg.find_version(NAME, pipeline_id="half-uploaded", stage="s") is None
    # A registry request that fails (a tag value over MLflow's limit) leaves no version behind.
    with pytest.raises(RegistrationError, match="registering stage s of pipeline too-long"):
        reg.register_stage_output(
            model_dir,
            stage="s",
            pipeline_id="too-long",
            store=S3ArtifactStore(s3.bucket, "registry-fail", endpoint_url=s3.endpoint_url),
            config_name="x" * 200_000,
        )
    assert reg.find_version(NAME, pipeline_id="too-long", stage="s") is None
    assert [x.version for x in reg.list_versions(NAME)] == before
    with pytest.raises(RegistrationError, match="is not a checkpoint directory"):
        reg.register_stage_output(registered.out, stage="s", pipeline_id="p", source=f"s3://{s3.bucket}/half")
