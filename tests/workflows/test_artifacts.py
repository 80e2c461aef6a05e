"""The artifact store: upload / download round trips on a local directory and on a real S3 server (moto), and the
manifest written last, so an interrupted upload is never listed, taken for complete, or downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workflows.artifacts import (
    MANIFEST,
    ArtifactConflict,
    ArtifactError,
    ArtifactIncomplete,
    ArtifactNotFound,
    LocalArtifactStore,
    S3ArtifactStore,
    build_manifest,
    check_key,
    open_store,
)


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    """A directory shaped like a checkpoint: nested files, one empty, one of 6 MiB (a multipart-sized body)."""
    root = tmp_path / "ckpt"
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "ola", "hidden": 32}))
    (root / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (root / "empty.txt").write_bytes(b"")
    (root / "model.safetensors").write_bytes(os.urandom(6 * 1024 * 1024))
    return root


@pytest.fixture
def s3_env(s3, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("OLA_S3_ENDPOINT_URL", s3.endpoint_url)
    return s3


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def test_s3_round_trip_list_exists_and_idempotent_upload(s3_env, checkpoint_dir: Path, tmp_path: Path) -> None:
    store = open_store(f"s3://{s3_env.bucket}/artifacts-rt")
    assert isinstance(store, S3ArtifactStore) and store.endpoint_url == s3_env.endpoint_url
    uri = store.upload_dir(checkpoint_dir, "tiny/run1/v/model")
    assert uri == f"s3://{s3_env.bucket}/artifacts-rt/tiny/run1/v/model"
    assert store.exists("tiny/run1/v/model") and not store.exists("tiny/run1/s/model")
    assert store.list() == ["tiny/run1/v/model"] and store.list("tiny/run1") == ["tiny/run1/v/model"]
    manifest = store.manifest("tiny/run1/v/model")
    assert manifest["files"]["model.safetensors"]["size"] == 6 * 1024 * 1024
    assert set(manifest["files"]) == {"config.json", "tokenizer/vocab.json", "empty.txt", "model.safetensors"}

    got = store.download_dir("tiny/run1/v/model", tmp_path / "down")
    assert _same_tree(checkpoint_dir, got) and not (got / MANIFEST).exists()
    # The artifact's own URI opens a store with the artifact at its root.
    again = open_store(uri).download_dir("", tmp_path / "down2")
    assert _same_tree(checkpoint_dir, again)

    # Same content again: nothing is re-sent. (Proof: an object swapped for same-size bytes stays swapped.)
    key = "artifacts-rt/tiny/run1/v/model/tokenizer/vocab.json"
    s3_env.client.put_object(Bucket=s3_env.bucket, Key=key, Body=b'{"b": 1}')
    assert store.upload_dir(checkpoint_dir, "tiny/run1/v/model") == uri
    assert s3_env.client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read() == b'{"b": 1}'
    (checkpoint_dir / "config.json").write_text("{}")
    with pytest.raises(ArtifactConflict, match="other content"):
        store.upload_dir(checkpoint_dir, "tiny/run1/v/model")
    store.upload_dir(checkpoint_dir, "tiny/run1/v/model", overwrite=True)
    assert store.download_dir("tiny/run1/v/model", tmp_path / "down3").joinpath("config.json").read_text() == "{}"
    with pytest.raises(FileExistsError, match="down3"):
        store.download_dir("tiny/run1/v/model", tmp_path / "down3")

    store.delete("tiny/run1/v/model")
    assert store.list() == [] and not store.exists("tiny/run1/v/model")


def test_s3_interrupted_upload_is_never_taken(s3_env, checkpoint_dir: Path, tmp_path: Path) -> None:
    """What a killed upload leaves (files without the manifest), a failed upload, and a damaged object."""
    store = S3ArtifactStore(s3_env.bucket, "artifacts-int")
    # A killed uploader: every file is there, the manifest (written last) is not.
    for rel in ("config.json", "tokenizer/vocab.json", "model.safetensors"):
        s3_env.client.upload_file(str(checkpoint_dir / rel), s3_env.bucket, f"artifacts-int/half/{rel}")
    assert store.list() == [] and not store.exists("half")
    with pytest.raises(ArtifactNotFound, match=f"no {MANIFEST}"):
        store.download_dir("half", tmp_path / "half")
    assert not (tmp_path / "half").exists()

    # An upload that fails midway (a file vanishes: a dangling link) raises and leaves nothing behind.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.bin").write_bytes(b"x" * 100)
    (broken / "b.bin").symlink_to(tmp_path / "does-not-exist")
    with pytest.raises((ArtifactError, OSError)):
        store.upload_dir(broken, "broken")
    assert not store.exists("broken")
    assert "Contents" not in s3_env.client.list_objects_v2(Bucket=s3_env.bucket, Prefix="artifacts-int/broken/")

    # A complete artifact whose object is then truncated: no longer listed, and a download refuses it.
    store.upload_dir(checkpoint_dir, "good")
    assert store.list() == ["good"]
    s3_env.client.put_object(Bucket=s3_env.bucket, Key="artifacts-int/good/model.safetensors", Body=b"short")
    assert store.list() == [] and not store.exists("good")
    with pytest.raises(ArtifactNotFound, match=r"model\.safetensors has 5 bytes"):
        store.download_dir("good", tmp_path / "good")
    # Same size, other bytes: the sizes agree, the sha256 does not; the destination is never created.
    size = (checkpoint_dir / "model.safetensors").stat().st_size
    s3_env.client.put_object(Bucket=s3_env.bucket, Key="artifacts-int/good/model.safetensors", Body=b"\0" * size)
    assert store.exists("good")
    with pytest.raises(ArtifactIncomplete, match="sha256 does not match"):
        store.download_dir("good", tmp_path / "good")
    assert not (tmp_path / "good").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".good.partial-")]


def test_local_store_round_trip_and_atomic_layout(checkpoint_dir: Path, tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    assert isinstance(store, LocalArtifactStore)
    uri = store.upload_dir(checkpoint_dir, "cfg/p1/v/model")
    assert Path(uri) == tmp_path / "store" / "cfg" / "p1" / "v" / "model"
    assert json.loads((Path(uri) / MANIFEST).read_text())["files"] == build_manifest(checkpoint_dir)["files"]
    assert store.list() == ["cfg/p1/v/model"]
    assert _same_tree(checkpoint_dir, store.download_dir("cfg/p1/v/model", tmp_path / "copy"))
    # A directory with files but no manifest (a crash before the rename, copied by hand) is not an artifact.
    (tmp_path / "store" / "cfg" / "p1" / "s" / "model").mkdir(parents=True)
    (tmp_path / "store" / "cfg" / "p1" / "s" / "model" / "config.json").write_text("{}")
    assert store.list("cfg") == ["cfg/p1/v/model"] and not store.exists("cfg/p1/s/model")
    assert open_store(f"file://{tmp_path / 'store'}").exists("cfg/p1/v/model")


def test_bad_keys_and_uris_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"artifact key '\.\./x'"):
        check_key("../x")
    with pytest.raises(ArtifactError, match=r"artifact key 'a/\.hidden'"):
        check_key("a/.hidden")
    assert check_key("/tiny/abc/1a/model/") == "tiny/abc/1a/model"
    with pytest.raises(ArtifactError, match="unsupported scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(ArtifactError, match="expected s3://bucket/prefix"):
        open_store("s3:///no-bucket")
    with pytest.raises(ArtifactError, match="holds no files"):
        LocalArtifactStore(tmp_path / "s").upload_dir(tmp_path, "k")


def test_unreachable_s3_is_an_artifact_error(checkpoint_dir: Path) -> None:
    import socket

    import boto3
    from botocore.config import Config

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = boto3.client(
        "s3",
        endpoint_url=dead,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )
    store = S3ArtifactStore("bucket", "x", endpoint_url=dead, client=client)
    with pytest.raises(ArtifactError, match=r"S3 read of s3://bucket/x/k/OLA_ARTIFACT\.json failed"):
        store.upload_dir(checkpoint_dir, "k")
