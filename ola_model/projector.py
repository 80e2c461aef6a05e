"""Projectors from encoder features to LLM-width embedding blocks.

* :class:`VisionProjector` (``OlaMLP`` in the checkpoint): ``proj1`` per token, 2x2 local-global attention pooling,
  GELU, ``proj2``; then the block layout with begin / sep / newline / end vectors.
* :class:`SpeechProjector` (``EncoderProjectorConcat``): stack 10 consecutive fused audio frames, Linear, ReLU, Linear;
  a newline vector after each 30 s chunk, begin / end around the whole clip.
"""

from __future__ import annotations

import torch
from torch import nn

from ola_model.errors import InputError


class LocalGlobalPooler(nn.Module):
    """2x2 local-global attention pooling (``NormalizedDwPooler``).

    For each non-overlapping 2x2 window with vectors x_1..x_4 (row-major) and their mean g, a 2-layer MLP scores
    [x_k ; g] per channel; a softmax over the 4 positions, independently per channel, weights the sum of the x_k.
    """

    def __init__(self, dim: int, window: int = 2) -> None:
        super().__init__()
        self.window = window
        self.predictor = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, h, w, C) with h, w multiples of the window -> (B, h/2, w/2, C)."""
        B, h, w, C = x.shape
        k = self.window
        if h % k or w % k:
            raise InputError(f"pooling needs a feature grid divisible by {k}, got {h}x{w}")
        windows = x.reshape(B, h // k, k, w // k, k, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/2, w/2, 2, 2, C)
        windows = windows.reshape(B, h // k, w // k, k * k, C)  # (B, h/2, w/2, 4, C)
        mean = windows.mean(dim=-2, keepdim=True).expand_as(windows)  # (B, h/2, w/2, 4, C)
        scores = self.predictor(torch.cat([windows, mean], dim=-1))  # (B, h/2, w/2, 4, C)
        weights = scores.softmax(dim=-2)  # softmax over the 4 window positions, per channel
        return (windows * weights).sum(dim=-2)  # (B, h/2, w/2, C)


class VisionProjector(nn.Module):
    """``OlaMLP``: ViT features -> pooled LLM-width feature maps, and the image / video block layouts."""

    def __init__(self, in_dim: int, out_dim: int, pool_window: int = 2) -> None:
        super().__init__()
        self.proj1 = nn.Linear(in_dim, out_dim)
        self.pooler = LocalGlobalPooler(out_dim, pool_window)
        self.act = nn.GELU()
        self.proj2 = nn.Linear(out_dim, out_dim)
        self.image_newline = nn.Parameter(torch.empty(out_dim))
        self.image_begin = nn.Parameter(torch.empty(out_dim))
        self.image_end = nn.Parameter(torch.empty(out_dim))
        self.image_sep = nn.Parameter(torch.empty(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.proj1.weight.device.type == "meta":
            return
        std = self.proj1.out_features**-0.5
        for vec in (self.image_newline, self.image_begin, self.image_end, self.image_sep):
            nn.init.normal_(vec, std=std)

    def forward(self, features: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """features (B, h*w, in_dim) on an (h, w) patch grid -> rows with newlines, (B, h/2 * (w/2 + 1), out_dim)."""
        B = features.shape[0]
        x = self.proj1(features).reshape(B, h, w, -1)  # (B, h, w, C)
        x = self.proj2(self.act(self.pooler(x)))  # (B, h/2, w/2, C)
        newline = self.image_newline.to(x.dtype).expand(B, x.shape[1], 1, -1)  # (B, h/2, 1, C)
        return torch.cat([x, newline], dim=2).flatten(1, 2)  # (B, h/2 * (w/2 + 1), C)

    def _vec(self, vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return vec.to(like.dtype)[None]  # (1, C)

    def image_block(self, lowres: torch.Tensor, highres: torch.Tensor) -> torch.Tensor:
        """One image's two projected views (N_l, C), (N_h, C) -> begin · low · sep · high · end, (N_l + N_h + 3, C)."""
        return torch.cat(
            [
                self._vec(self.image_begin, lowres),
                lowres,
                self._vec(self.image_sep, lowres),
                highres,
                self._vec(self.image_end, lowres),
            ]
        )

    def video_block(self, frames: torch.Tensor) -> torch.Tensor:
        """A video's projected frames (T, N, C) -> begin · (frame · sep) x T · end, (2 + T * (N + 1), C)."""
        T = frames.shape[0]
        sep = self.image_sep.to(frames.dtype).expand(T, 1, -1)  # (T, 1, C)
        body = torch.cat([frames, sep], dim=1).flatten(0, 1)  # (T * (N + 1), C)
        return torch.cat([self._vec(self.image_begin, body), body, self._vec(self.image_end, body)])


class SpeechProjector(nn.Module):
    """``EncoderProjectorConcat``: fused audio frames -> LLM-width speech block."""

    def __init__(self, in_dim: int, out_dim: int, ds_rate: int = 10, hidden: int = 2048) -> None:
        super().__init__()
        self.ds_rate = ds_rate
        self.linear1 = nn.Linear(in_dim * ds_rate, hidden)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden, out_dim)
        self.speech_newline = nn.Parameter(torch.empty(out_dim))
        self.speech_begin = nn.Parameter(torch.empty(out_dim))
        self.speech_end = nn.Parameter(torch.empty(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.linear1.weight.device.type == "meta":
            return
        std = self.linear2.out_features**-0.5
        for vec in (self.speech_newline, self.speech_begin, self.speech_end):
            nn.init.normal_(vec, std=std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (n_chunks, T, in_dim) -> begin · (T/k frames · newline) x n · end: (2 + n(T/k + 1), C)."""
        n, T, D = features.shape
        k = self.ds_rate
        T = T - T % k  # drop trailing frames so that T is a multiple of k (none for 1500)
        x = features[:, :T].reshape(n, T // k, D * k)  # (n, T/k, D*k)
        x = self.linear2(self.relu(self.linear1(x)))  # (n, T/k, C)
        newline = self.speech_newline.to(x.dtype).expand(n, 1, -1)  # (n, 1, C)
        body = torch.cat([x, newline], dim=1).flatten(0, 1)  # (n * (T/k + 1), C)
        begin, end = self.speech_begin.to(x.dtype)[None], self.speech_end.to(x.dtype)[None]
        return torch.cat([begin, body, end])
