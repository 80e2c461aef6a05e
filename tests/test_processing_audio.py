"""Audio preprocessing: decoding, downmix, resampling, 30 s chunking and Whisper log-mel features."""

from __future__ import annotations

from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from ola_model.errors import InputError, LimitError, MediaError
from ola_model.processing.audio import (
    AudioFeatures,
    chunk_audio,
    decode_audio_array,
    load_audio,
    process_audio,
    whisper_log_mel,
)

SR = 16000


def _sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_frequency(wav: torch.Tensor, rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(wav.numpy() * np.hanning(wav.shape[0])))
    return float(np.fft.rfftfreq(wav.shape[0], 1 / rate)[spectrum.argmax()])


def _encode_with_pyav(path: Path, codec: str, container_format: str, rate: int, samples: np.ndarray) -> None:
    """Write mono float samples with an FFmpeg encoder (raises if the encoder is missing)."""
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_size = stream.codec_context.frame_size or 1024
        fmt = stream.codec_context.format.name
        for start in range(0, len(samples), frame_size):
            block = samples[start : start + frame_size]
            if block.shape[0] < frame_size:
                block = np.pad(block, (0, frame_size - block.shape[0]))
            if fmt.startswith("s16"):
                block = (block * 32767).astype(np.int16)
            elif fmt.startswith("s32"):
                block = (block * 2147483647).astype(np.int32)
            frame = av.AudioFrame.from_ndarray(block[None, :], format=fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_wav_44k_mono_resampled_keeps_duration_and_pitch(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    sf.write(path, _sine(440, 44100, 1.0), 44100)
    wav = load_audio(path)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert wav.shape[0] == 16000
    assert abs(_dominant_frequency(wav) - 440) <= 2
    assert 0.4 < wav.abs().max().item() < 0.6


def test_wav_8k_stereo_opposite_channels_cancel(tmp_path: Path) -> None:
    left = _sine(300, 8000, 2.0)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, -left], axis=1), 8000)
    wav = load_audio(path)
    assert wav.shape[0] == 32000  # 2 s at 16 kHz
    assert wav.abs().max().item() < 1e-4  # 16-bit PCM rounds L and -L slightly differently


def test_stereo_downmix_averages(tmp_path: Path) -> None:
    left = _sine(440, 16000, 0.5)
    path = tmp_path / "stereo16k.flac"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 16000)
    wav = load_audio(path.read_bytes())  # bytes input, no resampling needed
    assert wav.shape[0] == left.shape[0]
    np.testing.assert_allclose(wav.numpy(), left / 2, atol=1e-4)


def test_mp3_through_pyav(tmp_path: Path) -> None:
    path = tmp_path / "tone.mp3"
    try:
        _encode_with_pyav(path, "libmp3lame", "mp3", 44100, _sine(440, 44100, 1.0))
    except (av.FFmpegError, ValueError) as exc:
        pytest.skip(f"PyAV cannot encode mp3 here: {exc}")
    wav = load_audio(path)
    assert abs(wav.shape[0] - 16000) < 0.1 * 16000  # encoder delay / padding add a few ms
    assert abs(_dominant_frequency(wav) - 440) <= 3


def test_m4a_aac_through_pyav(tmp_path: Path) -> None:
    path = tmp_path / "tone.m4a"
    _encode_with_pyav(path, "aac", "mp4", 22050, _sine(440, 22050, 1.0))
    wav = load_audio(path)
    assert abs(wav.shape[0] - 16000) < 0.15 * 16000
    assert abs(_dominant_frequency(wav) - 440) <= 3


def test_decode_audio_array_layouts_and_dtypes() -> None:
    mono = _sine(440, 8000, 0.5)
    out = decode_audio_array(mono, 8000)
    assert out.shape == (8000,) and out.dtype == torch.float32
    both = decode_audio_array(np.stack([mono, mono], axis=1), 16000)  # [N, C]
    np.testing.assert_allclose(both.numpy(), mono, atol=1e-7)
    pcm16 = np.array([0, 16384, -32768], dtype=np.int16)
    np.testing.assert_allclose(decode_audio_array(pcm16, 16000).numpy(), [0.0, 0.5, -1.0])
    pcm8 = np.array([128, 255, 0], dtype=np.uint8)
    np.testing.assert_allclose(decode_audio_array(pcm8, 16000).numpy(), [0.0, 127 / 128, -1.0])


@pytest.mark.parametrize(
    ("samples", "rate", "match"),
    [
        (np.zeros(0, dtype=np.float32), 16000, "empty"),
        (np.zeros((0, 2), dtype=np.float32), 16000, "empty"),
        (np.zeros((2, 3, 4), dtype=np.float32), 16000, r"\[N\] or \[N, C\]"),
        (np.array([0.0, np.nan], dtype=np.float32), 16000, "NaN"),
        (np.zeros(10, dtype=np.float32), 0, "sample rate"),
    ],
)
def test_decode_audio_array_errors(samples: np.ndarray, rate: int, match: str) -> None:
    with pytest.raises(MediaError, match=match) as info:
        decode_audio_array(samples, rate)
    assert info.value.kind == "audio"


def test_load_audio_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("not audio at all\n" * 50)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    for source, match in [
        (junk, None),
        (text, None),
        (empty, "empty"),
        (tmp_path / "missing.wav", "not found"),
        (b"", None),
    ]:
        with pytest.raises(MediaError, match=match) as info:
            load_audio(source)
        assert info.value.kind == "audio"
        assert info.value.reason


def test_video_without_audio_stream_is_an_audio_error(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(path)


def test_chunking_pads_the_last_chunk() -> None:
    wav = torch.linspace(-1, 1, 31 * SR)
    chunks = chunk_audio(wav)
    assert chunks.shape == (2, 480000) and chunks.dtype == torch.float32
    torch.testing.assert_close(chunks[0], wav[:480000])
    torch.testing.assert_close(chunks[1, :SR], wav[480000:])
    assert (chunks[1, SR:] == 0).all()
    assert chunk_audio(torch.ones(480000)).shape == (1, 480000)
    assert chunk_audio(torch.ones(1)).shape == (1, 480000)


def test_chunking_limits_and_errors() -> None:
    assert chunk_audio(torch.zeros(25 * 480000)).shape == (25, 480000)
    with pytest.raises(LimitError, match="25") as info:
        chunk_audio(torch.zeros(25 * 480000 + 1))
    assert info.value.value == 26 and info.value.limit == 25
    assert "12.5 minutes" in str(info.value)
    with pytest.raises(LimitError):
        chunk_audio(torch.zeros(301), chunk_samples=100, max_chunks=3)
    with pytest.raises(MediaError, match="empty"):
        chunk_audio(torch.zeros(0))
    with pytest.raises(InputError):
        chunk_audio(torch.zeros(2, 10))


def _reference_log_mel(chunk: torch.Tensor) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram written out independently: returns [128, 3000]."""
    window = torch.hann_window(400, dtype=torch.float64)
    stft = torch.stft(chunk.double(), 400, 160, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (201, 3000)
    filters = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=128)).double()  # (128, 201)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).float()


def test_whisper_log_mel_matches_reference_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(12 * SR) / SR
    wav = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(t.shape[0], generator=gen)
    chunks = chunk_audio(wav.float())  # one chunk, 18 s of zero padding
    mel = whisper_log_mel(chunks)
    assert mel.shape == (1, 3000, 128) and mel.dtype == torch.float32
    expected = _reference_log_mel(chunks[0]).T  # (3000, 128)
    torch.testing.assert_close(mel[0], expected, atol=1e-4, rtol=0)


def test_whisper_log_mel_per_chunk_and_shape_checks() -> None:
    gen = torch.Generator().manual_seed(1)
    chunks = torch.stack([0.01 * torch.randn(480000, generator=gen), 0.5 * torch.randn(480000, generator=gen)])
    mel = whisper_log_mel(chunks)
    assert mel.shape == (2, 3000, 128)
    # Each chunk is clamped to its own max - 8: computing chunks alone gives the same result.
    torch.testing.assert_close(mel[0], whisper_log_mel(chunks[:1])[0], atol=1e-5, rtol=0)
    with pytest.raises(InputError):
        whisper_log_mel(torch.zeros(1, 1000))
    with pytest.raises(InputError):
        whisper_log_mel(torch.zeros(480000))


def test_process_audio_bundles_features() -> None:
    wav = torch.from_numpy(_sine(440, SR, 31.0))
    features = process_audio(wav)
    assert isinstance(features, AudioFeatures)
    assert features.mel.shape == (2, 3000, 128)
    assert features.wav_chunks.shape == (2, 480000)
    assert features.num_samples == 31 * SR and features.num_chunks == 2
    with pytest.raises(LimitError):
        process_audio(wav, max_chunks=1)


def test_max_seconds_refuses_long_audio_early(tmp_path: Path) -> None:
    wav_path = tmp_path / "two_seconds.wav"
    sf.write(wav_path, _sine(440, 8000, 2.0), 8000)
    assert load_audio(wav_path, max_seconds=2.0).shape == (32000,)
    with pytest.raises(LimitError, match="audio duration"):
        load_audio(wav_path, max_seconds=1.5)
    m4a_path = tmp_path / "two_seconds.m4a"
    _encode_with_pyav(m4a_path, "aac", "mp4", 16000, _sine(440, 16000, 2.0))
    with pytest.raises(LimitError, match="audio duration"):
        load_audio(m4a_path, max_seconds=1.0)
