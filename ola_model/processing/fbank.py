"""Kaldi-compatible log-mel filterbank features, in plain PyTorch (no torchaudio).

Reproduces ``torchaudio.compliance.kaldi.fbank`` with the settings BEATs was trained with: 25 ms frames every 10 ms,
``snip_edges=True``, no dither, per-frame DC removal, pre-emphasis 0.97, the Povey window, zero-padding to the next
power of two, power spectrum, the Kaldi mel filterbank (20 Hz to Nyquist) and a log floored at float32 epsilon.
Frames are computed for a whole batch of waveforms at once.

With 128 bins at 16 kHz one filter (index 3) covers no FFT bin. Kaldi and kaldi-native-fbank refuse that setup;
torchaudio, which BEATs was trained with, returns the log floor for it, and so does this module.
"""

from __future__ import annotations

import functools
import math

import torch

from ola_model.errors import InputError

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
POVEY_POWER = 0.85
LOW_FREQ_HZ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # 1.1920929e-07, Kaldi's floor for the log energies
BEATS_SAMPLE_RATE = 16000
BEATS_WAVEFORM_SCALE = 2**15  # BEATs computes fbank on int16-scaled samples


def _frame_sizes(sample_rate: int) -> tuple[int, int, int]:
    """Window length, hop and FFT size in samples: (400, 160, 512) at 16 kHz."""
    window = round(sample_rate * FRAME_LENGTH_MS / 1000.0)
    shift = round(sample_rate * FRAME_SHIFT_MS / 1000.0)
    n_fft = 1 << (window - 1).bit_length()  # next power of two >= window
    return window, shift, n_fft


def num_frames(num_samples: int, sample_rate: int = BEATS_SAMPLE_RATE) -> int:
    """Frames Kaldi produces with ``snip_edges=True``: ``1 + (N - 400) // 160`` at 16 kHz (0 if too short)."""
    window, shift, _ = _frame_sizes(sample_rate)
    if num_samples < window:
        return 0
    return 1 + (num_samples - window) // shift


def _mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale: ``1127 * ln(1 + f / 700)``."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@functools.lru_cache(maxsize=16)
def _mel_banks(num_mel_bins: int, sample_rate: int) -> torch.Tensor:
    """The Kaldi triangular mel filterbank, float64 on CPU, shape (num_mel_bins, n_fft // 2 + 1).

    Filters are triangles in the mel domain between ``LOW_FREQ_HZ`` and Nyquist, evaluated at FFT bins
    ``0 .. n_fft/2 - 1``; the Nyquist bin gets weight 0, as in Kaldi.
    """
    _, _, n_fft = _frame_sizes(sample_rate)
    num_fft_bins = n_fft // 2
    nyquist = 0.5 * sample_rate
    mel_low = _mel_scale(LOW_FREQ_HZ)
    mel_high = _mel_scale(nyquist)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)

    # explicit CPU device: the cache must not hold tensors made under a `torch.device("meta")` context
    bins = torch.arange(num_mel_bins, dtype=torch.float64, device="cpu").unsqueeze(1)  # (M, 1)
    left = mel_low + bins * mel_delta
    center = mel_low + (bins + 1.0) * mel_delta
    right = mel_low + (bins + 2.0) * mel_delta
    fft_bin_width = sample_rate / n_fft
    mel = _mel_scale(fft_bin_width * torch.arange(num_fft_bins, dtype=torch.float64, device="cpu")).unsqueeze(0)
    up_slope = (mel - left) / (center - left)  # (M, n_fft/2)
    down_slope = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up_slope, down_slope), min=0.0)
    banks = torch.nn.functional.pad(banks, (0, 1))  # (M, n_fft/2 + 1): Nyquist weight 0
    return banks


@functools.lru_cache(maxsize=16)
def _povey_window(window_length: int) -> torch.Tensor:
    """Kaldi's Povey window (a Hann window with an N-1 denominator, raised to 0.85), float64 on CPU, (window,)."""
    n = torch.arange(window_length, dtype=torch.float64, device="cpu")
    hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / (window_length - 1))
    return hann.pow(POVEY_POWER)


def _batched_fbank(waveforms: torch.Tensor, num_mel_bins: int, sample_rate: int) -> torch.Tensor:
    """Log-mel fbank of a batch of equal-length waveforms, computed in the waveforms' floating dtype.

    Args:
        waveforms: (n, N) float samples, already scaled as wanted.
        num_mel_bins: mel filters M.
        sample_rate: sampling rate in Hz.

    Returns:
        (n, num_frames, M) log energies, same dtype as ``waveforms``.
    """
    window, shift, n_fft = _frame_sizes(sample_rate)
    x = waveforms
    p = PREEMPHASIS
    # Kaldi pre-emphasises each DC-free frame: y[i] = (x[i] - m) - p (x[i-1] - m) = e[i] - (1 - p) m for i >= 1, with
    # e the pre-emphasis of the whole signal and m the frame mean, and y[0] = (1 - p) (x[0] - m). Emphasising the
    # signal once and correcting per frame avoids copying the 2.5x-overlapping frames several times.
    emphasised = torch.empty_like(x)
    emphasised[..., 0] = x[..., 0] * (1.0 - p)
    torch.sub(x[..., 1:], x[..., :-1], alpha=p, out=emphasised[..., 1:])
    raw_frames = x.unfold(-1, window, shift)  # (n, F, window): a strided view, snip_edges=True
    means = raw_frames.mean(dim=-1, keepdim=True)  # (n, F, 1)
    povey = _povey_window(window).to(x.device, x.dtype)  # (window,)
    frames = emphasised.unfold(-1, window, shift) * povey  # (n, F, window)
    frames.sub_((1.0 - p) * means * povey)  # the frame's DC offset, as it comes out of the pre-emphasis
    frames[..., 0] = (1.0 - p) * (raw_frames[..., 0] - means[..., 0]) * povey[0]  # x[-1] := x[0] inside a frame
    spectrum = torch.fft.rfft(frames, n=n_fft)  # (n, F, n_fft/2 + 1), zero-padded to n_fft
    squares = torch.view_as_real(spectrum).square().flatten(-2)  # (n, F, 2 * (n_fft/2 + 1)): re^2, im^2 interleaved
    banks = _mel_banks(num_mel_bins, sample_rate).to(x.device, x.dtype)  # (M, n_fft/2 + 1)
    # |X|^2 = re^2 + im^2 folded into the filterbank product: each weight applies to both interleaved squares
    mel_energies = torch.matmul(squares, banks.repeat_interleave(2, dim=1).T)  # (n, F, M)
    return mel_energies.clamp_(min=LOG_FLOOR).log_()


def kaldi_fbank(waveform: torch.Tensor, num_mel_bins: int = 128, sample_rate: int = 16000) -> torch.Tensor:
    """Kaldi log-mel filterbank of one waveform (``torchaudio.compliance.kaldi.fbank`` semantics, no dither).

    Args:
        waveform: (N,) float samples, already scaled as the caller wants (BEATs uses int16 scale). Computed in
            float64 when the waveform is float64 (for reference checks), else in float32 like torchaudio.
        num_mel_bins: number of mel filters.
        sample_rate: sampling rate in Hz.

    Returns:
        (num_frames, num_mel_bins) float32, ``num_frames = 1 + (N - 400) // 160`` at 16 kHz.

    Raises:
        InputError: the waveform is not 1-D or is shorter than one frame.
    """
    if waveform.dim() != 1:
        raise InputError(f"kaldi_fbank waveform must be 1-D (N,), got shape {list(waveform.shape)}")
    window, _, _ = _frame_sizes(sample_rate)
    if waveform.shape[0] < window:
        raise InputError(f"kaldi_fbank waveform has {waveform.shape[0]} samples, fewer than one {window}-sample frame")
    dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    return _batched_fbank(waveform.to(dtype).unsqueeze(0), num_mel_bins, sample_rate)[0].to(torch.float32)


def beats_fbank(chunks: torch.Tensor, mean: float, std: float, num_mel_bins: int = 128) -> torch.Tensor:
    """BEATs input features for a batch of 16 kHz audio chunks.

    Scales the samples by 2**15, computes the Kaldi fbank of every chunk at once and normalises it as
    ``(x - mean) / (2 * std)``.

    Args:
        chunks: (n, N) float waveforms in [-1, 1]; N = 480000 for 30 s chunks.
        mean: fbank mean of the BEATs training data (``BeatsConfig.fbank_mean``).
        std: fbank standard deviation (``BeatsConfig.fbank_std``).
        num_mel_bins: mel filters.

    Returns:
        (n, num_frames, num_mel_bins) float32; (n, 2998, 128) for 30 s chunks.

    Raises:
        InputError: ``chunks`` is not 2-D or its chunks are shorter than one frame.
    """
    if chunks.dim() != 2:
        raise InputError(f"beats_fbank chunks must be 2-D (n, samples), got shape {list(chunks.shape)}")
    window, _, _ = _frame_sizes(BEATS_SAMPLE_RATE)
    if chunks.shape[1] < window:
        raise InputError(f"beats_fbank chunks have {chunks.shape[1]} samples, fewer than one {window}-sample frame")
    features = _batched_fbank(chunks.to(torch.float32) * BEATS_WAVEFORM_SCALE, num_mel_bins, BEATS_SAMPLE_RATE)
    return (features - mean) / (2.0 * std)
