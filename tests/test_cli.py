"""The `ola` command line, run as a user would (subprocess)."""

import subprocess
import sys

import pytest
from PIL import Image


def ola(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "ola_model.cli", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_inspect_prints_part_sizes_and_checkpoint_keys():
    r = ola("inspect", "--preset", "ola-7b")
    assert r.returncode == 0, r.stderr
    assert "7,615,616,512" in r.stdout and "431,226,864" in r.stdout
    assert "model.speech_encoder.whisper_model.blocks.31.attn.key.weight  [1280, 1280]" in r.stdout
    assert "model.vision_tower.vision_tower.pos_embed  [1, 16384, 1152]" in r.stdout


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    r = ola("init", "--preset", "tiny", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_generate_streams_an_answer_from_a_checkpoint(ckpt, tmp_path):
    Image.new("RGB", (200, 100), (0, 255, 0)).save(tmp_path / "g.png")
    r = ola(
        "generate",
        "--checkpoint",
        ckpt,
        "--image",
        tmp_path / "g.png",
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
        "What colour is it?",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # an answer was printed
    assert "image " in r.stderr and "first text" in r.stderr  # the usage line on stderr


def test_bad_media_exits_2_with_a_clear_message(ckpt, tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    r = ola("generate", "--checkpoint", ckpt, "--image", tmp_path / "x.png", "hi")
    assert r.returncode == 2
    assert "error: image" in r.stderr and "Traceback" not in r.stderr
    r = ola("generate", "--checkpoint", tmp_path / "missing", "hi")
    assert r.returncode == 2 and "config.json" in r.stderr


def test_inspect_verifies_a_checkpoint_directory(ckpt):
    r = ola("inspect", "--checkpoint", ckpt, "--no-keys")
    assert r.returncode == 0, r.stderr
    assert "all keys and shapes match" in r.stdout and "'tiny'" in r.stdout
