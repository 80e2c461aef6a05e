"""TTS backends: real espeak-ng speech, chunking and resampling, voice choice, input errors; CosyVoice's clear
failure when it cannot run, and its adapter against a stand-in of the ``cosyvoice`` package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import types
import wave
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import pytest

from services.tts import BackendUnavailable, TTSConfig, TTSInputError, make_backend
from services.tts.backend import PcmChunker, text_language
from services.tts.cosyvoice import REQUIRED_FILES, CosyVoiceBackend
from services.tts.espeak import NORMAL_WPM, EspeakBackend

ENGLISH = "The quick brown fox jumps over the lazy dog near the river bank."
CHINESE = "你好，世界。今天天气很好。"


@pytest.fixture(scope="module")
def espeak() -> EspeakBackend:
    """The program engine: deterministic, the same audio for the same text every time."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; the setup installs it: run scripts/install-system.sh (as root)")
    return EspeakBackend(sample_rate=24000, engine="process")


@pytest.fixture(scope="module")
def espeak_lib() -> EspeakBackend:
    """The in-process engine (libespeak-ng, installed with espeak-ng)."""
    return EspeakBackend(sample_rate=24000, engine="library")


def pcm_of(chunks) -> np.ndarray:
    return np.frombuffer(b"".join(c.data for c in chunks), dtype="<i2")


# ------------------------------------------------------------------------------------------------------- espeak-ng
def assert_speech(pcm: np.ndarray) -> None:
    """24 kHz int16 of ENGLISH: a plausible duration, loud enough, with pauses and voiced parts."""
    duration = len(pcm) / 24000
    words = len(ENGLISH.split())
    assert 0.15 * words < duration < 1.5 * words + 0.5, duration
    rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    assert rms > 300, f"near-silent output (rms {rms})"
    # Speech has pauses and voiced parts: the loudness varies a lot over 50 ms windows.
    frames = pcm[: len(pcm) // 1200 * 1200].reshape(-1, 1200).astype(np.float64)
    loudness = np.sqrt((frames**2).mean(axis=1))
    assert loudness.max() > 10 * (loudness.min() + 1)


def test_espeak_speaks_real_audio(espeak):
    assert_speech(pcm_of(espeak.synthesize(ENGLISH, voice="en-us")))


def test_espeak_chunks_are_ordered_and_sized(espeak):
    chunks = list(espeak.synthesize("Hello there, this is a test.", voice="en-us"))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.sample_rate == 24000 for c in chunks)
    assert all(c.num_samples == 2400 for c in chunks[:-1])  # 100 ms at 24 kHz
    assert 0 < chunks[-1].num_samples <= 2400


def test_espeak_at_its_native_rate_equals_its_wav_file(espeak, tmp_path):
    out = tmp_path / "ref.wav"
    text = "Native rate, no resampling."
    subprocess.run(
        ["espeak-ng", "-b", "1", "-v", "en-us", "-s", str(NORMAL_WPM), "-w", str(out), text], check=True, timeout=30
    )
    with wave.open(str(out)) as w:
        rate, reference = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    chunks = list(espeak.synthesize(text, voice="en-us", sample_rate=rate))
    assert chunks[0].sample_rate == rate
    np.testing.assert_array_equal(pcm_of(chunks), reference)


def test_chunk_size_does_not_change_the_audio():
    whole = {}
    for chunk_ms in (20, 100, 700):
        backend = EspeakBackend(sample_rate=16000, chunk_ms=chunk_ms, engine="process")
        whole[chunk_ms] = pcm_of(backend.synthesize(ENGLISH, voice="en-gb"))
    np.testing.assert_array_equal(whole[20], whole[100])
    np.testing.assert_array_equal(whole[20], whole[700])


def test_sample_rate_is_honoured(espeak):
    durations = {}
    for rate in (8000, 16000, 44100):
        chunks = list(espeak.synthesize(ENGLISH, voice="en-us", sample_rate=rate))
        assert {c.sample_rate for c in chunks} == {rate}
        assert all(c.num_samples == rate // 10 for c in chunks[:-1])
        durations[rate] = sum(c.duration_s for c in chunks)
    assert max(durations.values()) - min(durations.values()) < 0.02, durations


def test_speed_changes_the_duration(espeak):
    normal = pcm_of(espeak.synthesize(ENGLISH, voice="en-us")).size
    fast = pcm_of(espeak.synthesize(ENGLISH, voice="en-us", speed=2.0)).size
    assert fast < 0.7 * normal


def test_chinese_text_is_spoken_by_the_mandarin_voice(espeak):
    assert text_language(CHINESE) == "zh" and text_language("我是Ola") == "zh"
    assert text_language(ENGLISH) == "en" and text_language("The word 猫 means cat.") == "en"
    assert espeak.resolve_voice(CHINESE, "auto") == "cmn"
    assert espeak.resolve_voice(CHINESE) == "cmn"  # the default voice is auto
    assert espeak.resolve_voice(ENGLISH) == "en-us"
    auto = pcm_of(espeak.synthesize(CHINESE, voice="auto"))
    np.testing.assert_array_equal(auto, pcm_of(espeak.synthesize(CHINESE, voice="cmn")))
    assert not np.array_equal(auto[: min(auto.size, 24000)], pcm_of(espeak.synthesize(CHINESE, voice="en-us"))[:24000])
    assert np.abs(auto).max() > 1000


def test_voices_list_and_aliases(espeak):
    voices = {v.id: v for v in espeak.voices()}
    assert {"en-us", "en-gb", "cmn"} <= set(voices)
    assert "zh" in voices["cmn"].languages and voices["en-us"].name.startswith("English")
    assert [v.id for v in espeak.voices()] == sorted(voices)
    assert espeak.resolve_voice("x", "EN-US") == "en-us"
    assert espeak.resolve_voice("x", "zh") == "cmn"  # espeak-ng's preferred voice for the alias
    assert espeak.resolve_voice("x", "en-us+f3") == "en-us+f3"


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"voice": "klingon"}, "voice", "'klingon' is not an espeak-ng voice"),
        ({"voice": "en-us+nosuchvariant"}, "voice", "unknown variant"),
        ({"text": ""}, "text", "is empty"),
        ({"text": "  \n "}, "text", "is empty"),
        ({"text": "a" * 2001}, "text", "2001 characters, over the limit of 2000"),
        ({"speed": 3.0}, "speed", r"outside \[0.5, 2.0\]"),
        ({"sample_rate": 4000}, "sample_rate", "4000 Hz"),
    ],
)
def test_bad_requests_fail_before_synthesis_naming_the_field(espeak, monkeypatch, kwargs, field, message):
    def no_process(*args, **kw):
        raise AssertionError("espeak-ng must not run for an invalid request")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    args = {"text": "Hello.", **kwargs}
    with pytest.raises(TTSInputError, match=message) as info:
        espeak.synthesize(args.pop("text"), **args)  # raises at the call, before iteration
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and str(info.value).startswith(f"{field}: ")
    assert info.value.grpc_code == "INVALID_ARGUMENT"


def test_stopping_early_ends_the_espeak_process(espeak, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    stream = espeak.synthesize(ENGLISH * 20, voice="en-us")
    first = next(stream)
    assert first.index == 0 and not first.is_last
    stream.close()  # what a cancelled request does
    assert len(started) == 1 and started[0].poll() is not None


# ---------------------------------------------------------------------------------------- espeak-ng, in-process
def test_the_library_engine_is_the_default_and_speaks(espeak_lib):
    assert make_backend().engine == "library" and espeak_lib.engine == "library"
    assert_speech(pcm_of(espeak_lib.synthesize(ENGLISH, voice="en-us")))
    chunks = list(espeak_lib.synthesize("Hello there, this is a test.", voice="en-us"))
    assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].is_last
    assert all(c.num_samples == 2400 for c in chunks[:-1])


def test_the_librarys_first_text_equals_the_programs_audio(tmp_path):
    """Sample for sample, in a fresh process. Later texts differ slightly (the synthesizer carries state such as its
    pitch flutter and noise from one text to the next), so they are compared by duration below."""
    out = tmp_path / "lib.pcm"
    code = (
        "import sys, numpy as np; from services.tts.espeak import EspeakBackend; "
        "b = EspeakBackend(engine='library'); "
        f"pcm = b''.join(c.data for c in b.synthesize({ENGLISH!r}, voice='en-us', sample_rate=22050)); "
        "open(sys.argv[1], 'wb').write(pcm)"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=60)
    reference = pcm_of(EspeakBackend(engine="process").synthesize(ENGLISH, voice="en-us", sample_rate=22050))
    np.testing.assert_array_equal(np.frombuffer(out.read_bytes(), dtype="<i2"), reference)


@pytest.mark.parametrize(
    ("text", "voice", "speed"), [(ENGLISH, "en-us", 1.0), (ENGLISH, "en-gb+f3", 2.0), (CHINESE, "cmn", 1.0)]
)
def test_the_library_speaks_as_long_as_the_program(espeak, espeak_lib, text, voice, speed):
    for _ in range(2):  # not only the first text of the process
        lib = pcm_of(espeak_lib.synthesize(text, voice=voice, speed=speed)).size
        program = pcm_of(espeak.synthesize(text, voice=voice, speed=speed)).size
        assert abs(lib - program) <= 0.01 * program, (lib, program)


def test_the_library_stops_when_the_consumer_does_and_serves_threads_in_turn(espeak_lib):
    stream = espeak_lib.synthesize(ENGLISH * 30, voice="en-us")
    assert next(stream).index == 0
    stream.close()  # what a cancelled request does: the synthesis stops at its next piece, the library is free
    deadline = time.monotonic() + 5
    while any(t.name == "espeak" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "espeak" for t in threading.enumerate())
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: pcm_of(espeak_lib.synthesize(ENGLISH, voice="en-us")).size, range(4)))
    assert max(sizes) - min(sizes) <= 0.01 * max(sizes)


def test_library_engine_missing_is_backend_unavailable(monkeypatch):
    from services.tts import libespeak

    def missing(name="espeak-ng"):
        raise libespeak.LibEspeakError("cannot load libespeak-ng.so.1: not found")

    monkeypatch.setattr(libespeak, "load", missing)
    with pytest.raises(BackendUnavailable, match=r"cannot load libespeak-ng\.so\.1") as info:
        EspeakBackend(engine="library")
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    assert EspeakBackend(engine="auto").engine == "process"  # auto falls back to the program
    with pytest.raises(ValueError, match="engine must be"):
        EspeakBackend(engine="gpu")


def test_espeak_missing_is_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="not on PATH; install it") as info:
        EspeakBackend(executable="espeak-ng-not-installed")
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    with pytest.raises(ValueError, match="default_voice"):
        EspeakBackend(default_voice="klingon")


def test_pcm_chunker_passes_samples_through_at_the_same_rate():
    chunker = PcmChunker(16000, 16000, chunk_ms=10)
    samples = np.arange(-500, 500, dtype=np.int16)
    chunks = [*chunker.push(samples[:333]), *chunker.push(samples[333:]), *chunker.finish()]
    assert [c.num_samples for c in chunks] == [160] * 6 + [40]
    np.testing.assert_array_equal(pcm_of(chunks), samples)
    silent = list(PcmChunker(16000, 24000, 100).finish())
    assert len(silent) == 1 and silent[0].is_last and silent[0].data == b""


# ------------------------------------------------------------------------------------------------------ the config
def test_config_validation_and_factory(tmp_path):
    assert isinstance(make_backend(), EspeakBackend)
    backend = make_backend({"backend": "espeak", "sample_rate": 16000, "default_voice": "en-gb", "chunk_ms": 50})
    assert backend.sample_rate == 16000 and backend.default_voice == "en-gb" and backend.chunk_ms == 50
    with pytest.raises(ValueError, match="unknown TTS config keys"):
        TTSConfig.from_dict({"backend": "espeak", "voice": "x"})
    with pytest.raises(ValueError, match="backend must be one of"):
        TTSConfig(backend="piper")
    with pytest.raises(ValueError, match="sample_rate"):
        TTSConfig(sample_rate=96000)
    with pytest.raises(ValueError, match="cosyvoice settings"):
        TTSConfig(backend="espeak", model_dir=str(tmp_path))
    assert make_backend({"espeak_engine": "process"}).engine == "process"
    with pytest.raises(ValueError, match="espeak_engine must be one of"):
        TTSConfig(espeak_engine="gpu")
    with pytest.raises(ValueError, match="espeak setting"):
        TTSConfig(backend="cosyvoice", espeak_engine="library")


# ------------------------------------------------------------------------------------------------------- CosyVoice
def _model_dir(tmp_path):
    for name in REQUIRED_FILES:
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_cosyvoice_without_model_dir_is_unavailable():
    with pytest.raises(BackendUnavailable, match="no model directory is configured") as info:
        make_backend(TTSConfig(backend="cosyvoice"))
    assert info.value.backend == "cosyvoice" and info.value.grpc_code == "FAILED_PRECONDITION"


def test_cosyvoice_with_missing_or_incomplete_dir_is_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="does not exist"):
        make_backend({"backend": "cosyvoice", "model_dir": str(tmp_path / "absent")})
    (tmp_path / "llm.pt").write_bytes(b"")
    with pytest.raises(BackendUnavailable, match=r"not a CosyVoice 2 model directory: missing cosyvoice2\.yaml"):
        make_backend({"backend": "cosyvoice", "model_dir": str(tmp_path)})


def test_cosyvoice_without_the_package_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cosyvoice", None)  # as here: the package cannot be installed
    with pytest.raises(BackendUnavailable, match="the `cosyvoice` package cannot be imported") as info:
        make_backend({"backend": "cosyvoice", "model_dir": str(_model_dir(tmp_path))})
    assert "FunAudioLLM/CosyVoice" in info.value.reason and "espeak" in info.value.reason


class FakeCosyVoice2:
    """Stands in for cosyvoice.cli.cosyvoice.CosyVoice2: 24 kHz, yields speech pieces as dicts of (1, T) tensors."""

    sample_rate = 24000
    calls: ClassVar[list] = []

    def __init__(self, model_dir, load_jit=False, load_trt=False, fp16=False):
        self.model_dir = model_dir

    def list_available_spks(self):
        return ["中文女", "英文男"]

    def _pieces(self, n):
        import torch

        for k in range(n):
            t = torch.arange(k * 5000, (k + 1) * 5000) / self.sample_rate
            yield {"tts_speech": (0.5 * torch.sin(2 * torch.pi * 220 * t))[None]}

    def inference_sft(self, text, spk_id, stream=False, speed=1.0):
        FakeCosyVoice2.calls.append(("sft", text, spk_id, stream, speed))
        return self._pieces(3)

    def inference_zero_shot(self, text, prompt_text, prompt_speech_16k, stream=False, speed=1.0):
        FakeCosyVoice2.calls.append(("zero_shot", text, prompt_text, tuple(prompt_speech_16k.shape), stream, speed))
        return self._pieces(2)


def test_cosyvoice_adapter_streams_the_models_speech(tmp_path, monkeypatch):
    import soundfile

    for name in ("cosyvoice", "cosyvoice.cli"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("cosyvoice.cli.cosyvoice")
    module.CosyVoice2 = FakeCosyVoice2
    monkeypatch.setitem(sys.modules, "cosyvoice.cli.cosyvoice", module)
    prompt = tmp_path / "prompt.wav"
    soundfile.write(prompt, np.zeros(8000, dtype=np.float32), 8000)
    FakeCosyVoice2.calls = []

    backend = make_backend(
        {
            "backend": "cosyvoice",
            "model_dir": str(_model_dir(tmp_path)),
            "sample_rate": 16000,
            "prompt_voices": {"alice": [str(prompt), "Hello, I am Alice."]},
        }
    )
    assert isinstance(backend, CosyVoiceBackend)
    assert [v.id for v in backend.voices()] == sorted(["alice", "中文女", "英文男"])
    assert backend.resolve_voice(CHINESE, "auto") == "中文女"  # the default: the first speaker

    chunks = list(backend.synthesize("你好。", voice="中文女", speed=1.5))
    assert FakeCosyVoice2.calls[-1] == ("sft", "你好。", "中文女", True, 1.5)
    assert {c.sample_rate for c in chunks} == {16000} and chunks[-1].is_last
    assert abs(sum(c.duration_s for c in chunks) - 15000 / 24000) < 0.01  # 3 pieces of 5000 samples at 24 kHz
    assert np.abs(pcm_of(chunks)).max() > 10000

    list(backend.synthesize("Hi.", voice="alice"))
    assert FakeCosyVoice2.calls[-1] == ("zero_shot", "Hi.", "Hello, I am Alice.", (1, 16000), True, 1.0)
    with pytest.raises(TTSInputError, match="not a CosyVoice speaker"):
        backend.synthesize("Hi.", voice="bob")
