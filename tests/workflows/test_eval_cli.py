"""``ola eval``: run as a user would (a subprocess writing --json), plus its argument and input errors (exit 2)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ola_model import save_checkpoint
from ola_model.cli import main
from workflows.data import SynthParams, synthesize
from workflows.eval import SYNTH_METRICS

# Tasks that need no espeak-ng: one image_qa and one sound_qa sample, both in the test split.
PARAMS = SynthParams(seed=5, size=2, mix={"image_qa": 1.0, "sound_qa": 1.0}, splits={"train": 0, "val": 0, "test": 1})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evalcli") / "ds"
    synthesize(out, PARAMS, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model, tiny_tok) -> Path:
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("evalcli-ckpt") / "tiny", tokenizer=tiny_tok)


def ola(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ola_model.cli", *map(str, args)],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        env=env,
    )


def test_ola_eval_prints_a_table_and_writes_json(dataset: Path, checkpoint: Path, tmp_path: Path) -> None:
    out, preds = tmp_path / "reports" / "eval.json", tmp_path / "preds.jsonl"
    proc = ola("eval", "--checkpoint", checkpoint, "--data", dataset, "--json", out, "--predictions", preds)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert table[0].split() == ["metric", "value", "n"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:-1]}
    assert rows["image_qa_accuracy"][1] == "1" and rows["sound_qa_accuracy"][1] == "1"
    assert rows["asr_wer"] == ["-", "0"]  # no asr sample in this split: not measured, not 0
    assert "eval" in proc.stderr  # the progress bar goes to stderr

    data = json.loads(out.read_text())
    for key in SYNTH_METRICS:
        assert key in data and key in data["counts"]
    assert data["image_qa_accuracy"] in (0.0, 1.0) and data["counts"]["image_qa_accuracy"] == 1
    assert data["asr_wer"] is None and data["counts"]["asr_wer"] == 0
    meta = data["meta"]
    assert meta["checkpoint"] == str(checkpoint.resolve()) and meta["checkpoint_source"] == "given"
    assert meta["data_manifest_sha256"] == hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()
    assert meta["split"] == "test" and meta["seconds"] > 0
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert sorted(r["task"] for r in lines) == ["image_qa", "sound_qa"]
    assert all(isinstance(r["prediction"], str) and "scores" in r for r in lines)


def test_argument_and_input_errors_exit_2(
    dataset: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    cases = [
        (["--checkpoint", checkpoint, "--data", tmp_path / "nope"], f"--data {tmp_path / 'nope'}: no such directory"),
        (["--checkpoint", corrupt, "--data", dataset], "cannot be loaded"),
        (["--checkpoint", tmp_path / "none", "--data", dataset], "no such directory"),
        (["--checkpoint", checkpoint, "--data", incomplete], "no manifest.json"),
        (["--checkpoint", checkpoint], "either --data DIR"),
        (["--checkpoint", checkpoint, "--data", dataset, "--benchmark", "mmbench"], "either --data DIR"),
        (["--checkpoint", checkpoint, "--benchmark", "mmbench"], "needs --bench-path"),
        (["--checkpoint", checkpoint, "--benchmark", "mmbench", "--bench-path", tmp_path / "x.tsv"], "no such file"),
        (["--checkpoint", checkpoint, "--data", dataset, "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--checkpoint", checkpoint, "--data", dataset, "--limit", "-1"], "--limit must be >= 1"),
    ]
    for args, message in cases:
        assert main(["eval", *map(str, args), "--no-progress"]) == 2, args
        assert message in capsys.readouterr().err, args
    with pytest.raises(SystemExit) as exc:  # argparse: an unknown split
        main(["eval", "--checkpoint", str(checkpoint), "--data", str(dataset), "--split", "dev"])
    assert exc.value.code == 2
    assert "invalid choice: 'dev'" in capsys.readouterr().err


def test_without_checkpoint_the_demo_model_is_used(
    dataset: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("OLA_DEMO_MODEL", str(tmp_path / "no-demo-here"))
    assert main(["eval", "--data", str(dataset), "--no-progress"]) == 2
    assert "demo" in capsys.readouterr().err
    monkeypatch.setenv("OLA_DEMO_MODEL", str(checkpoint))
    out = tmp_path / "demo.json"
    assert main(["eval", "--data", str(dataset), "--no-progress", "--limit", "1", "--json", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["checkpoint_source"] == "demo" and meta["checkpoint"] == str(checkpoint.resolve())


def test_benchmark_through_the_cli(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    tsv = tmp_path / "mmbench.tsv"
    image = base64.b64encode(buf.getvalue()).decode()
    tsv.write_text(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\timage\n" + f"0\tWhat color?\t\tred\tblue\t\t\tA\t{image}\n"
    )
    out = tmp_path / "mm.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--benchmark", "mmbench", "--bench-path", str(tsv)]
    assert main([*args, "--json", str(out), "--no-progress"]) == 0
    assert "mmbench_accuracy" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["counts"]["mmbench_accuracy"] == 1 and data["mmbench_accuracy"] in (0.0, 1.0)
    assert data["meta"]["benchmark"] == "mmbench" and data["meta"]["bench_path"] == str(tsv.resolve())
