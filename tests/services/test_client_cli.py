"""``ola serve`` / ``ola chat`` as a user runs them, and the client's helpers.

``ola serve`` runs in a subprocess (``python -m services.cli``, the same commands as the ``ola`` entry point) with its
own local Ray session in a private temp dir, on free loopback ports; ``ola chat`` talks to it in another subprocess.
SIGINT must stop it cleanly: exit status 0 (or 130), every process it started gone.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.client import ChatResult, OlaClient, OlaError, Speech, collect, media_ref, read_error_detail, sampling
from services.gen.ola.common.v1 import audio_chunk_pb2, errors_pb2, media_pb2
from services.gen.ola.omni.v1 import omni_pb2

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------------------ ola serve / chat
@pytest.fixture(scope="module")
def served():
    """``ola serve`` in a subprocess; yields (process, address, output queue, process tree before stopping)."""
    import psutil

    port = _free_port()
    temp = tempfile.mkdtemp(prefix="olaray")  # short: Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "serve",
            "--port",
            str(port),
            "--http-port",
            str(_free_port()),
            "--num-cpus",
            "2",
            "--ray-temp-dir",
            temp,
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            output.append(line)
            if line.startswith("ola serve: ready at"):
                break
        else:
            pytest.fail(f"ola serve was not ready within {READY_TIMEOUT_S} s:\n{''.join(output[-40:])}")
        assert proc.poll() is None, f"ola serve exited with {proc.returncode}:\n{''.join(output[-40:])}"
        driver = psutil.Process(proc.pid)
        tree = [driver, *driver.children(recursive=True)]
        yield proc, f"127.0.0.1:{port}", output, lines, tree
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ola_serve_prints_its_address(served):
    _, address, output, _, _ = served
    ready = [line for line in output if line.startswith("ola serve: ready at")]
    assert ready and address in ready[0] and "omni" in ready[0]


def test_ola_chat_streams_text_and_writes_speech(served, media, tmp_path):
    import soundfile as sf

    _, address, _, _, _ = served
    image = tmp_path / "red.png"
    image.write_bytes(media.red_png)
    wav = tmp_path / "answer.wav"
    done = _cli(
        "chat",
        "--target",
        address,
        "--image",
        str(image),
        "--speak",
        str(wav),
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "What colour is it?",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # the answer's text (noise from random weights, but text)
    assert "usage: prompt" in done.stderr and "session " in done.stderr and "speech:" in done.stderr
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == 24000 and audio.ndim == 1 and len(audio) > rate // 5
    assert float(np.abs(audio).max()) > 0.01  # espeak-ng speech, not silence

    bad = tmp_path / "bad.png"
    bad.write_bytes(media.corrupt_png)
    failed = _cli("chat", "--target", address, "--image", str(bad), "What is it?")
    assert failed.returncode == 2
    assert "error: INVALID_ARGUMENT" in failed.stderr and "images[0]" in failed.stderr


def test_ola_serve_stops_cleanly_on_sigint(served):
    import psutil

    proc, _, output, lines, tree = served
    assert len(tree) > 3  # the driver, Ray's daemons and the Serve actors
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) in (0, 130)
    time.sleep(0.5)
    while not lines.empty():
        output.append(lines.get())
    assert any("shutting down" in line for line in output)

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 20
    alive = tree
    while alive and time.monotonic() < deadline:
        alive = [p for p in tree if running(p)]
        time.sleep(0.2)
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_ola_serve_rejects_a_bad_config_before_starting_ray(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("vision:\n  num_replicas: -1\nllm:\n  max_batchh: 4\n")
    done = _cli("serve", "--config", str(config), timeout=60)
    assert done.returncode == 2
    assert "vision.num_replicas" in done.stderr and "llm.max_batchh: unknown key" in done.stderr
    done = _cli("serve", "--checkpoint", str(tmp_path / "no-such-dir"), timeout=60)
    assert done.returncode == 2 and "no-such-dir: not a directory" in done.stderr


# ------------------------------------------------------------------------------------------------ client helpers
def test_media_refs_from_paths_bytes_and_uris(tmp_path):
    path = tmp_path / "clip.WAV"
    path.write_bytes(b"RIFF")
    assert media_ref(path) == media_pb2.MediaRef(inline_data=b"RIFF", mime_type="audio/wav")
    assert media_ref(b"\x89PNG").inline_data == b"\x89PNG"
    assert media_ref("s3://media/a.mp4").uri == "s3://media/a.mp4"
    with pytest.raises(FileNotFoundError):
        media_ref(tmp_path / "missing.png")
    params = sampling(temperature=0.0, max_new_tokens=5)
    assert params.HasField("temperature") and not params.HasField("top_k") and params.max_new_tokens == 5


def test_request_asks_for_speech_only_when_told():
    client = OlaClient("127.0.0.1:1")  # nothing is called: building requests needs no server
    try:
        text_only = client.request("hi")
        spoken = client.request("hi", images=[b"x"], speak=True, session_id="s", sample_rate_hz=16000)
    finally:
        client.close()
    assert list(text_only.output_modalities) == [omni_pb2.OUTPUT_MODALITY_TEXT]
    assert omni_pb2.OUTPUT_MODALITY_AUDIO in spoken.output_modalities and spoken.session_id == "s"
    assert spoken.speech.sample_rate_hz == 16000 and len(spoken.images) == 1


def _events(rate: int = 16000) -> list[omni_pb2.ChatResponse]:
    tone = (0.3 * np.sin(np.arange(1600) / 5) * 32767).astype("<i2").tobytes()

    def chunk(index: int, text: str, pcm: bytes, last: bool) -> omni_pb2.ChatResponse:
        audio = audio_chunk_pb2.AudioChunk(pcm16=pcm, sample_rate_hz=rate, is_last=last)
        return omni_pb2.ChatResponse(
            audio_chunk=omni_pb2.SpeechChunk(sentence_index=index, sentence_text=text, audio=audio)
        )

    return [
        omni_pb2.ChatResponse(started=omni_pb2.ChatStarted(session_id="s1", model_version="v")),
        omni_pb2.ChatResponse(text_delta=omni_pb2.TextDelta(text="Red. ")),
        chunk(0, "Red.", tone[:1600], False),
        chunk(0, "", tone[1600:], True),
        omni_pb2.ChatResponse(text_delta=omni_pb2.TextDelta(text="Bright.")),
        chunk(1, "Bright.", tone, True),
        omni_pb2.ChatResponse(final=omni_pb2.ChatFinal(finish_reason=1, text="Red. Bright.")),
    ]


def test_collect_joins_text_and_writes_the_speech_as_one_wav(tmp_path):
    import soundfile as sf

    result = collect(_events())
    assert isinstance(result, ChatResult)
    assert (result.text, result.session_id, result.finish_reason) == ("Red. Bright.", "s1", "STOP")
    assert result.speech.sentences == ["Red.", "Bright."] and result.speech.duration_s == pytest.approx(0.2)
    path = result.speech.write_wav(tmp_path / "out.wav")
    audio, rate = sf.read(path, dtype="int16")
    assert rate == 16000 and len(audio) == 3200 and np.abs(audio).max() > 1000
    with pytest.raises(ValueError, match="no speech"):
        Speech().write_wav(tmp_path / "none.wav")
    mixed = Speech()
    mixed.add(_events(16000)[2].audio_chunk)
    with pytest.raises(ValueError, match="one rate"):
        mixed.add(_events(24000)[2].audio_chunk)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, detail: errors_pb2.ErrorDetail) -> None:
        self._detail = detail

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return self._detail.message

    def trailing_metadata(self):
        return (("ola-error-detail-bin", self._detail.SerializeToString()),)


def test_errors_name_the_code_reason_field_and_limit():
    detail = errors_pb2.ErrorDetail(
        reason=errors_pb2.ERROR_REASON_TOO_MANY_FRAMES,
        field="max_frames",
        value=80,
        limit=64,
        unit="frames",
        message="max_frames: 80 frames is over the limit of 64",
    )
    error = OlaError.from_rpc(_FakeRpcError(detail))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.detail == detail
    assert error.reason == "ERROR_REASON_TOO_MANY_FRAMES"
    text = str(error)
    assert text.startswith("INVALID_ARGUMENT: max_frames: 80 frames") and "field max_frames" in text
    assert "value 80 over the limit 64 frames" in text
    assert read_error_detail([("other", b"x")]) is None


def test_speech_keeps_each_sentence_once_however_many_chunks_it_has():
    from services.client import Speech
    from services.gen.ola.common.v1 import audio_chunk_pb2
    from services.gen.ola.omni.v1 import omni_pb2

    speech = Speech()
    for index, text, n in [(0, "One.", 3), (1, "Two.", 2)]:
        for i in range(n):
            audio = audio_chunk_pb2.AudioChunk(pcm16=b"\x00\x01" * 10, sample_rate_hz=16000, chunk_index=i)
            speech.add(omni_pb2.SpeechChunk(sentence_index=index, sentence_text=text, audio=audio))
    assert speech.sentences == ["One.", "Two."]
    assert speech.duration_s == 5 * 10 / 16000
