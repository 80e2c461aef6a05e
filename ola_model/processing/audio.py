"""Audio preprocessing for Ola's speech encoders (reference ``ola-architecture.md`` §3.1).

Any file or PCM array -> 16 kHz mono float32 -> consecutive 30 s chunks (the last zero-padded, at most 25) ->
Whisper log-mel features [n, 3000, 128]. The raw padded chunks are kept too: BEATs reads the waveform.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import av
import librosa
import numpy as np
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from ola_model.errors import InputError, LimitError, MediaError
from ola_model.processing.av_packets import TolerantDecoder, exception_reason

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 480000  # 30 s at 16 kHz: Whisper's fixed input length
N_MELS = 128
HOP_LENGTH = 160
N_FFT = 400


@dataclass
class AudioFeatures:
    """One audio input, ready for the speech encoders.

    Attributes:
        mel: [n, 3000, 128] float32 Whisper log-mel features, one row block per 30 s chunk.
        wav_chunks: [n, 480000] float32 16 kHz mono waveform chunks, the last zero-padded.
        num_samples: length of the unpadded 16 kHz waveform.
    """

    mel: torch.Tensor
    wav_chunks: torch.Tensor
    num_samples: int

    @property
    def num_chunks(self) -> int:
        return int(self.wav_chunks.shape[0])


def _describe(source: str | Path | bytes) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _as_file(source: str | Path | bytes) -> str | io.BytesIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return str(source)


def _duration_limit_error(seconds: float, max_seconds: float) -> LimitError:
    return LimitError(
        "audio duration (seconds)",
        math.ceil(seconds),
        math.floor(max_seconds),
        "send a shorter recording",
    )


def _read_soundfile(source: str | Path | bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode with libsndfile. Returns ([N, C] float32, sample rate)."""
    with sf.SoundFile(_as_file(source)) as file:
        rate = int(file.samplerate)
        if max_seconds is not None and file.frames > max_seconds * rate:
            raise _duration_limit_error(file.frames / rate, max_seconds)
        data = file.read(dtype="float32", always_2d=True)
    return data, rate


def decode_audio_stream(
    container: av.container.InputContainer, what: str, max_seconds: float | None = None
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of an open PyAV container at its native rate and channel count.

    Args:
        container: an input container with at least one audio stream.
        what: description of the source, for error messages.
        max_seconds: stop with a LimitError as soon as more than this much audio has decoded (None: no limit).

    Returns:
        ([N, C] float32 samples, sample rate).

    Raises:
        MediaError: ("audio", ...) when there is no audio stream or it cannot be decoded.
        LimitError: when the audio is longer than ``max_seconds``.
    """
    if not container.streams.audio:
        raise MediaError("audio", what, "no audio stream")
    stream = container.streams.audio[0]
    rate = int(stream.codec_context.sample_rate or stream.sample_rate or 0)
    # Convert every decoded frame to planar float at the first frame's layout and rate; librosa resamples later.
    resampler = av.AudioResampler(format="fltp")
    parts: list[np.ndarray] = []
    num_samples = 0
    decoder = TolerantDecoder("audio", what)
    try:
        for frame in decoder.frames(container, stream):
            for out in resampler.resample(frame):
                rate = int(out.sample_rate)
                parts.append(out.to_ndarray())  # (C, n)
                num_samples += out.samples
                if max_seconds is not None and num_samples > max_seconds * rate:
                    # Stop decoding early: a long upload must not be held in memory at its native rate.
                    raise _duration_limit_error(num_samples / rate, max_seconds)
    except InputError:  # our own limit, not a decoding failure
        raise
    except (av.FFmpegError, ValueError) as exc:  # the container itself broke off
        logger.warning("audio %s: reading stopped early (%s)", what, exception_reason(exc))
    if parts:
        parts.extend(out.to_ndarray() for out in resampler.resample(None))  # flush
    elif decoder.bad_packets:
        raise MediaError("audio", what, f"cannot decode the audio stream ({decoder.bad_packets} corrupt packets)")
    if decoder.bad_packets:
        logger.warning("audio %s: %d undecodable packets skipped", what, decoder.bad_packets)
    if not parts:
        return np.zeros((0, 1), dtype=np.float32), rate
    return np.concatenate(parts, axis=1).T.astype(np.float32, copy=False), rate  # (N, C)


def _read_pyav(source: str | Path | bytes, what: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with av.open(_as_file(source), mode="r") as container:
        return decode_audio_stream(container, what, max_seconds)


def decode_audio_array(samples: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Convert in-memory PCM to Ola's waveform: mono, ``target_rate`` Hz, float32.

    Args:
        samples: [N] (mono) or [N, C] (N samples of C channels, soundfile's layout). Floating-point samples are used
            as they are (nominally in [-1, 1]); integer PCM is scaled by its type's full range (int16 / 32768, ...;
            unsigned types are centred first).
        sample_rate: rate of ``samples`` in Hz.
        target_rate: output rate in Hz.

    Returns:
        [M] float32, channels averaged, resampled with librosa (soxr_hq) when the rate differs.

    Raises:
        MediaError: ("audio", ...) for an empty array, a bad shape or rate, or non-finite samples.
    """
    what = "array"
    arr = np.asarray(samples)
    if arr.ndim not in (1, 2):
        raise MediaError("audio", what, f"expected shape [N] or [N, C], got {list(arr.shape)}")
    if sample_rate <= 0:
        raise MediaError("audio", what, f"sample rate must be positive, got {sample_rate}")
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        half = float(np.iinfo(arr.dtype).max + 1) / 2
        arr = (arr.astype(np.float64) - half) / half
    elif np.issubdtype(arr.dtype, np.signedinteger):
        arr = arr.astype(np.float64) / float(-np.iinfo(arr.dtype).min)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise MediaError("audio", what, f"unsupported sample dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim == 2:
        if arr.shape[1] == 0:
            raise MediaError("audio", what, "no channels")
        arr = arr.mean(axis=1)  # downmix (N, C) -> (N,)
    if arr.size == 0:
        raise MediaError("audio", what, "no samples (empty audio)")
    if not np.isfinite(arr).all():
        raise MediaError("audio", what, "contains NaN or infinite samples")
    if sample_rate != target_rate:
        arr = librosa.resample(arr, orig_sr=sample_rate, target_sr=target_rate, res_type="soxr_hq")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def load_audio(
    source: str | Path | bytes, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> torch.Tensor:
    """Load an audio file (or the audio track of a media file) as mono float32 at ``sample_rate`` Hz.

    Tries libsndfile first (wav, flac, ogg, ...), then PyAV/FFmpeg (mp3, m4a, the audio track of mp4 / mkv, ...).

    Args:
        source: a file path, or the encoded file's bytes.
        sample_rate: output rate in Hz.
        max_seconds: refuse audio longer than this before decoding all of it (None: no limit here; the chunk limit
            of :func:`chunk_audio` still applies, e.g. 25 chunks * 30 s = 750 s).

    Returns:
        [N] float32 waveform; channels averaged.

    Raises:
        MediaError: ("audio", ...) when the file is missing, corrupt, has no audio stream or no samples.
        LimitError: when the audio is longer than ``max_seconds``.
    """
    what = _describe(source)
    if not isinstance(source, (bytes, bytearray, memoryview)) and not Path(source).is_file():
        raise MediaError("audio", what, "file not found")
    try:
        data, rate = _read_soundfile(source, max_seconds)
    except LimitError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_exc:
        logger.debug("audio %s: soundfile cannot read it (%s); trying PyAV", what, sf_exc)
        try:
            data, rate = _read_pyav(source, what, max_seconds)
        except (MediaError, LimitError):
            raise
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError("audio", what, f"cannot decode audio: {exception_reason(exc)}") from exc
    if data.shape[0] == 0:
        raise MediaError("audio", what, "no samples (empty audio)")
    try:
        return decode_audio_array(data, rate, target_rate=sample_rate)
    except MediaError as exc:
        raise MediaError("audio", what, exc.reason) from exc


def chunk_audio(
    wav: torch.Tensor,
    chunk_samples: int = CHUNK_SAMPLES,
    max_chunks: int = 25,
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """Split a waveform into consecutive fixed-length chunks, zero-padding the last one.

    Args:
        wav: [N] float waveform at ``sample_rate`` Hz.
        chunk_samples: chunk length (480000 = 30 s at 16 kHz).
        max_chunks: most chunks allowed (``LimitsConfig.max_audio_chunks``); more is an error, not a truncation.
        sample_rate: rate of ``wav``, only used to state the limit in minutes.

    Returns:
        [n, chunk_samples] float32 with n = ceil(N / chunk_samples).

    Raises:
        MediaError: for an empty waveform. InputError: for a waveform that is not 1-D.
        LimitError: when n > ``max_chunks``.
    """
    if wav.dim() != 1:
        raise InputError(f"audio waveform must be 1-D [N], got shape {list(wav.shape)}")
    num_samples = int(wav.shape[0])
    if num_samples == 0:
        raise MediaError("audio", "waveform", "no samples (empty audio)")
    num_chunks = -(-num_samples // chunk_samples)
    if num_chunks > max_chunks:
        minutes = max_chunks * chunk_samples / sample_rate / 60
        raise LimitError(
            "audio chunks",
            num_chunks,
            max_chunks,
            f"audio is limited to {max_chunks} chunks of {chunk_samples / sample_rate:g} s "
            f"({minutes:g} minutes); this audio lasts {num_samples / sample_rate / 60:.2f} minutes",
        )
    padded = torch.zeros(num_chunks * chunk_samples, dtype=torch.float32)
    padded[:num_samples] = wav.to(torch.float32)
    return padded.view(num_chunks, chunk_samples)  # (n, chunk_samples)


@functools.lru_cache(maxsize=4)
def _feature_extractor(n_mels: int, sample_rate: int, n_fft: int, hop_length: int) -> WhisperFeatureExtractor:
    """The Whisper log-mel extractor, built from explicit numbers (no files) and cached."""
    return WhisperFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=sample_rate,
        hop_length=hop_length,
        chunk_length=CHUNK_SAMPLES // sample_rate,
        n_fft=n_fft,
        padding_value=0.0,
        return_attention_mask=False,
    )


def whisper_log_mel(chunks: torch.Tensor, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Whisper log-mel spectrogram of each 30 s chunk (openai-whisper's ``log_mel_spectrogram``).

    STFT (n_fft 400, hop 160, Hann), power, mel filterbank, log10 (floor 1e-10), clamp to (chunk max - 8),
    then (x + 4) / 4; the last STFT frame is dropped. Computed by transformers' ``WhisperFeatureExtractor``.

    Args:
        chunks: [n, 480000] float waveform chunks at 16 kHz.
        n_mels: mel bins (128 for Whisper large-v3).
        sample_rate: rate of ``chunks``.

    Returns:
        [n, 3000, 128] float32 (time-major: Ola's model layout; the extractor's own is [n, 128, 3000]).
    """
    if chunks.dim() != 2 or chunks.shape[1] != CHUNK_SAMPLES:
        raise InputError(f"audio chunks must have shape [n, {CHUNK_SAMPLES}], got {list(chunks.shape)}")
    if chunks.shape[0] == 0:
        raise InputError("audio chunks are empty: expected at least one chunk")
    extractor = _feature_extractor(n_mels, sample_rate, N_FFT, HOP_LENGTH)
    batch = chunks.detach().to("cpu", torch.float32).numpy()
    features = extractor(list(batch), sampling_rate=sample_rate, return_tensors="np")["input_features"]  # (n, M, T)
    return torch.from_numpy(np.ascontiguousarray(features.transpose(0, 2, 1), dtype=np.float32))  # (n, T, M)


def process_audio(wav: torch.Tensor, max_chunks: int = 25) -> AudioFeatures:
    """Chunk a 16 kHz mono waveform and compute its Whisper features.

    Args:
        wav: [N] float32 waveform at 16 kHz (e.g. from :func:`load_audio`).
        max_chunks: most 30 s chunks allowed (``LimitsConfig.max_audio_chunks``).

    Returns:
        :class:`AudioFeatures` with ``mel`` [n, 3000, 128] and ``wav_chunks`` [n, 480000].
    """
    chunks = chunk_audio(wav, max_chunks=max_chunks)
    return AudioFeatures(mel=whisper_log_mel(chunks), wav_chunks=chunks, num_samples=int(wav.shape[0]))
