"""Smoke tests of the benchmarks in ``bench/``: each main() runs at a toy size and returns sane numbers."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``bench.<name>`` from this checkout (the repository root need not be on ``sys.path``)."""
    if str(REPO_ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module(f"bench.{name}")


def test_load_memory_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_memory = _bench("load_memory", monkeypatch)
    out = tmp_path / "load.json"
    workdir = tmp_path / "work"
    workdir.mkdir()
    args = ["--size-gb", "0.01", "--shard-mb", "2", "--workdir", str(workdir), "--json", str(out)]
    result = load_memory.main(args)

    assert json.loads(out.read_text())["checkpoint"]["bytes"] == result["checkpoint"]["bytes"]
    assert 0.5e7 < result["checkpoint"]["bytes"] < 4e7
    assert result["checkpoint"]["shards"] > 1
    assert set(result["methods"]) == {"ours", "naive"}
    for r in result["methods"].values():
        assert r["load_s"] > 0
        assert r["rss_after_import_bytes"] > 0
        assert r["peak_rss_bytes"] >= r["rss_after_import_bytes"]
        assert r["peak_net_over_size"] > 0
    assert result["ours_over_naive"] > 0
    assert result["methods"]["ours"]["fingerprint"] == pytest.approx(result["methods"]["naive"]["fingerprint"])
    assert list(workdir.iterdir()) == []  # the generated checkpoint is cleaned up


def test_tiny_latency_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_latency = _bench("tiny_latency", monkeypatch)
    out = tmp_path / "latency.json"
    args = ["--repeats", "1", "--warmup", "0", "--video-frames", "2", "--prefill", "32", "64"]
    args += ["--decode-batch", "1", "2", "--decode-prompt", "8", "--decode-steps", "3", "--json", str(out)]
    result = tiny_latency.main(args)

    assert json.loads(out.read_text())["stages"] == result["stages"]
    stages = [r["stage"] for r in result["stages"]]
    for name in ("ViT + projector, image", "ViT + projector, video", "Whisper encoder", "BEATs (incl. fbank)",
                 "speech projector", "mel features"):  # fmt: skip
        assert name in stages
    assert stages.count("LLM prefill") == 2
    assert stages.count("LLM decode") == 2
    for r in result["stages"]:
        assert r["median_s"] > 0
        assert r["min_s"] <= r["median_s"]
    decode = [r for r in result["stages"] if r["stage"] == "LLM decode"]
    assert all(r["tokens_per_s"] > 0 for r in decode)
    assert result["decode_step_weight_bytes"] > 0


def test_engine_streams_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine_streams = _bench("engine_streams", monkeypatch)
    out = tmp_path / "streams.json"
    args = ["--streams", "1", "3", "--prompt", "8", "--new-tokens", "4", "--threads", "1", "--json", str(out)]
    result = engine_streams.main(args)

    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["streams"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["engine_tok_s"] > 0 and row["generate_tok_s"] > 0 and row["ratio"] > 0
        assert 0 < row["engine_ttft_median_ms"] <= row["engine_ttft_max_ms"] and row["generate_ttft_ms"] > 0
        assert row["step_ms"] > 0 and row["bound_fraction"] is None  # no bandwidth bound on CPU
    assert result["decode_step_weight_bytes"] > 0 and result["bandwidth_bound_step_ms"] is None


def test_serving_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every part of bench/serving.py at toy size: services in their own processes, clients in theirs."""
    serving = _bench("serving", monkeypatch)
    out = tmp_path / "serving.json"
    args = ["--concurrency", "1,2", "--new-tokens", "8", "--repeats", "2", "--chats", "2", "--cache-repeats", "1"]
    args += ["--load", "closed,bursts", "--audio-attempts", "1"]
    args += ["--audio-sentences", "3", "--vision-chats", "2", "--vision-rounds", "1", "--json", str(out)]
    result = serving.main(args)

    assert json.loads(out.read_text())["throughput"] == result["throughput"]
    runs = [(r["load"], r["images"], r["concurrency"]) for r in result["throughput"]]
    assert runs == [(load, images, n) for load in ("closed", "bursts") for images in (1, 0) for n in (1, 2)]
    for row in result["throughput"]:
        assert row["chats_per_run"] == 2 and row["tokens"] == 8 * 2 and row["services_tok_s"] > 0 and row["ratio"] > 0
        assert row["engine_alone_tok_s"] > 0 and len(row["services_runs_tok_s"]) == 2
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        assert row["ratio_min"] <= row["ratio_paired"] <= row["ratio_max"]
        assert 1 <= row["max_batch"] <= row["concurrency"]
    assert {r["input"] for r in result["cache"]} == {"image 1000x750", "video 16 frames 320x240"}
    assert all(r["hit_ms"] > 0 and r["miss_ms"] > 0 for r in result["cache"])
    [answer] = result["first_audio"]
    assert answer["talker_sentences"] == 3 and answer["sentences"] >= 3  # the talker learnt its paragraph
    assert 0 < answer["sentence_wise_ms"] and 0 < answer["whole_answer_ms"] <= answer["whole_waveform_ms"]
    assert [r["vision_replicas"] for r in result["vision_replicas"]] == [1, 2]
    assert all(r["chats_per_s"] > 0 for r in result["vision_replicas"])


def test_serving_refuses_unknown_loads_and_kinds(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    serving = _bench("serving", monkeypatch)
    for args, message in (
        (["--load", "closed,nope"], "--load: unknown nope (known: closed, bursts)"),
        (["--kinds", "video"], "--kinds: unknown video (known: image, text)"),
    ):
        with pytest.raises(SystemExit):
            serving.main(args)
        assert message in capsys.readouterr().err


def test_scene_qa_probe_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _bench("scene_qa_probe", monkeypatch)
    runs = {
        "cells": ["--arms", "cells", "--steps", "150"],
        "encoder": ["--arms", "encoder", "--steps", "4"],
        "highres": ["--arms", "encoder", "--steps", "4", "--encoder-tokens", "highres"],
    }
    results = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        assert probe.main([*extra, "--batch", "8", "--test", "150", "--json", str(out)]) == 0
        (results[name],) = json.loads(out.read_text())["results"]
    for r in results.values():
        assert 0.0 <= r["all"] <= 1.0 and r["train_s"] > 0
        assert set(probe.KINDS) <= set(r)  # 150 test questions cover every kind
    # the background colour is in every cell token: 150 steps learn it
    assert results["cells"]["background"] > 0.9
    # a 160 x 160 picture: 5 x 5 pooled tokens per view; the block adds row newlines, the low-res view, begin/sep/end
    rng = np.random.default_rng(0)
    scene = probe.sc.sample_scene(rng)
    scene = probe.sc.Scene(160, 160, scene.background, scene.groups)
    assert probe.make_encoder(None, "highres")(scene, np.random.default_rng(1)).shape == (25, 128)
    assert probe.make_encoder(None, "block")(scene, np.random.default_rng(1)).shape == (3 + 2 * 5 * 6, 128)


def test_vision_token_probe_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _bench("vision_token_probe", monkeypatch)
    from workflows.training.smoke_data import write_smoke_dataset

    data = write_smoke_dataset(tmp_path / "smoke")
    out = tmp_path / "readout.json"
    assert probe.main(["readout", "--images", "160", "--vit-patches", str(data), "--json", str(out)]) == 0
    rows = {r["tokens"]: r for r in json.loads(out.read_text())["results"]}
    patched = f"random, patch embedding from {data}"
    assert set(rows) == {"pixels of the token", "random initialisation", "demo model", patched}
    # a lone shape's colour is plain in its own pixels: 40 held-out pictures, 7 colours
    assert rows["pixels of the token"]["colour_linear"] > 0.6
    for r in rows.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("kind_linear", "kind_mlp", "colour_linear"))

    out = tmp_path / "supervise.json"
    assert (
        probe.main(["supervise", "--steps", "6", "--every", "3", "--batch", "2", "--test", "6", "--json", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())["results"]
    assert [r["step"] for r in rows] == [3, 6]
    assert rows[0]["object_tokens"] > 0 and all(0.0 <= r["kind"] <= 1.0 for r in rows)
    # the labels: one object token per shape whose centre is in a distinct token, the group's kind and colour
    view, labels = probe.labelled_scene(np.random.default_rng(3), scale=1.0)
    assert labels.shape == (view.shape[-2] // 32 * (view.shape[-1] // 32), 4)
    objects = labels[labels[:, 3] == 1]
    assert len(objects) > 0 and (objects[:, 0] >= 0).all() and (labels[labels[:, 3] == 0][:, 0] == -1).all()
