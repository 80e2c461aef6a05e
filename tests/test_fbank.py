"""The Kaldi fbank (``ola_model.processing.fbank``): frame counts, batching, and parity with two references.

References: ``kaldi-native-fbank`` (a C++ Kaldi port; it refuses 128 bins at 16 kHz because one filter is empty, so
it is compared at 80 and 120 bins) and the numpy Kaldi-compatible path of ``transformers.audio_utils`` (at 128 bins).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ola_model.errors import InputError
from ola_model.processing import fbank as fbank_module
from ola_model.processing.fbank import beats_fbank, kaldi_fbank, num_frames

SR = 16000
INT16 = 2**15
LOG_EPS = math.log(torch.finfo(torch.float32).eps)


def _noise(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(int(seconds * SR), generator=gen, dtype=torch.float64) * 2 - 1) * 0.3 * INT16


def _sweep(seconds: float = 2.0) -> torch.Tensor:
    """A linear chirp from 50 Hz to 8 kHz at half scale: every filter sees a peak, most frames a deep stopband."""
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    f0, f1 = 50.0, 8000.0
    return torch.sin(2 * math.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2)) * 0.5 * INT16


SIGNALS = {"noise": _noise, "sweep": _sweep}


def test_frame_count_30s() -> None:
    assert num_frames(480000) == 2998
    assert num_frames(399) == 0
    assert num_frames(400) == 1
    assert num_frames(560) == 2
    out = kaldi_fbank(torch.zeros(480000))
    assert out.shape == (2998, 128)
    assert out.dtype == torch.float32
    # silence: every energy is floored at float32 epsilon
    torch.testing.assert_close(out, torch.full_like(out, LOG_EPS))


def test_beats_fbank_shape_and_normalisation() -> None:
    gen = torch.Generator().manual_seed(1)
    chunks = torch.rand(3, 480000, generator=gen) * 2 - 1
    mean, std = 15.41663, 6.55582
    out = beats_fbank(chunks, mean, std)
    assert out.shape == (3, 2998, 128)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # batched == one chunk at a time through the single-waveform API
    for i in (0, 2):
        expected = (kaldi_fbank(chunks[i] * INT16) - mean) / (2 * std)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_input_error() -> None:
    with pytest.raises(InputError, match="1-D"):
        kaldi_fbank(torch.zeros(2, 1000))
    with pytest.raises(InputError, match="fewer than one 400-sample frame"):
        kaldi_fbank(torch.zeros(399))
    with pytest.raises(InputError, match="2-D"):
        beats_fbank(torch.zeros(480000), 0.0, 1.0)
    with pytest.raises(InputError, match="fewer than one 400-sample frame"):
        beats_fbank(torch.zeros(2, 100), 0.0, 1.0)


def test_mel_banks_cached_on_cpu_even_under_meta_default_device() -> None:
    fbank_module._mel_banks.cache_clear()
    with torch.device("meta"):
        out = kaldi_fbank(torch.ones(800, device="cpu"))
        banks = fbank_module._mel_banks(128, SR)
    assert out.device.type == "cpu" and out.shape == (3, 128)
    assert banks.device.type == "cpu"
    assert fbank_module._mel_banks(128, SR) is banks
    # Kaldi triangles: weights in [0, 1], the Nyquist bin unused, filter 3 empty at 128 bins / 512-point FFT
    assert banks.shape == (128, 257)
    assert banks.min() >= 0 and banks.max() <= 1
    assert (banks[:, 256] == 0).all()
    assert (banks.sum(dim=1) == 0).nonzero().flatten().tolist() == [3]


def _knf_fbank(waveform: torch.Tensor, num_bins: int) -> torch.Tensor:
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SR
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0  # Nyquist
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    online = knf.OnlineFbank(opts)
    online.accept_waveform(SR, waveform.tolist())
    online.input_finished()
    return torch.tensor(np.stack([online.get_frame(i) for i in range(online.num_frames_ready)]))


@pytest.mark.parametrize("num_bins", [80, 120])
@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_parity_with_kaldi_native_fbank(signal: str, num_bins: int) -> None:
    pytest.importorskip("kaldi_native_fbank")
    waveform = SIGNALS[signal]()
    expected = _knf_fbank(waveform, num_bins)
    ours = kaldi_fbank(waveform.to(torch.float32), num_mel_bins=num_bins)
    assert ours.shape == expected.shape == (num_frames(waveform.numel()), num_bins)
    # Energies far below the frame's peak are float32 rounding noise in both implementations: compare the rest.
    meaningful = expected > 10.0
    assert meaningful.float().mean() > 0.1  # the sweep lights up a band of filters per frame
    diff = (ours - expected).abs()[meaningful]
    assert diff.max() < 3e-3, f"max |log diff| {diff.max():.2e}"
    assert diff.mean() < 1e-4, f"mean |log diff| {diff.mean():.2e}"


@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_parity_with_transformers_kaldi_path_at_128_bins(signal: str) -> None:
    audio_utils = pytest.importorskip("transformers.audio_utils")
    waveform = SIGNALS[signal]()
    with pytest.warns(UserWarning, match="all zero values"):  # the empty filter 3, as in torchaudio
        mel_filters = audio_utils.mel_filter_bank(
            num_frequency_bins=257,
            num_mel_filters=128,
            min_frequency=20.0,
            max_frequency=SR / 2,
            sampling_rate=SR,
            norm=None,
            mel_scale="kaldi",
            triangularize_in_mel_space=True,
        )
    povey = audio_utils.window_function(400, "hann", periodic=False) ** 0.85
    expected = audio_utils.spectrogram(
        waveform.numpy(),
        povey,
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=mel_filters,
        log_mel="log",
        mel_floor=float(torch.finfo(torch.float32).eps),
        remove_dc_offset=True,
        dtype=np.float64,
    ).T
    expected = torch.from_numpy(expected).to(torch.float32)
    # float64 input: the same algorithm in double precision agrees everywhere, stopbands and empty filter included
    torch.testing.assert_close(kaldi_fbank(waveform), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(kaldi_fbank(waveform)[:, 3], torch.full_like(expected[:, 3], LOG_EPS))
    # float32 input (what beats_fbank uses): close wherever the energy is meaningful
    ours32 = kaldi_fbank(waveform.to(torch.float32))
    meaningful = expected > 10.0
    assert (ours32 - expected).abs()[meaningful].max() < 3e-3
