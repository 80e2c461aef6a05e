"""The dual audio encoder: Whisper-large-v3 (speech) and BEATs (sounds, music), fused along channels.

Whisper reuses transformers' ``WhisperEncoder``; the checkpoint stores it under openai-whisper names, which
``ola_model.checkpoint.name_map`` translates. BEATs is ``ola_model.beats`` and always runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig as HFWhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ola_model.beats import Beats
from ola_model.config import BeatsConfig, WhisperConfig
from ola_model.errors import InputError

WHISPER_MEL_FRAMES = 3000  # 30 s of 10 ms frames: the only input length Whisper accepts


def whisper_hf_config(cfg: WhisperConfig) -> HFWhisperConfig:
    """The transformers config of the encoder; decoder fields are unused but must be consistent."""
    hf = HFWhisperConfig(
        num_mel_bins=cfg.num_mel_bins,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        encoder_attention_heads=cfg.encoder_attention_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim,
        max_source_positions=cfg.max_source_positions,
        activation_function="gelu",  # exact GELU, as openai-whisper
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        decoder_layers=1,
        decoder_attention_heads=cfg.encoder_attention_heads,
        decoder_ffn_dim=cfg.encoder_ffn_dim,
        vocab_size=51866,
        pad_token_id=50256,
        bos_token_id=50257,
        eos_token_id=50257,
        decoder_start_token_id=50258,
    )
    hf._attn_implementation = "sdpa"
    return hf


def build_whisper_encoder(cfg: WhisperConfig) -> WhisperEncoder:
    return WhisperEncoder(whisper_hf_config(cfg))


class DualAudioEncoder(nn.Module):
    """``DualWrappedEncoder``: Whisper || BEATs -> (n, 1500, d_whisper + d_beats)."""

    def __init__(self, whisper: WhisperConfig, beats: BeatsConfig) -> None:
        super().__init__()
        self.whisper_model = build_whisper_encoder(whisper)
        self.beats_model = Beats.from_config(beats)

    @property
    def out_dim(self) -> int:
        return self.whisper_model.config.d_model + self.beats_model.encoder_embed_dim

    def forward(self, mel: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        """Encode 30 s chunks.

        Args:
            mel: (n, 3000, n_mels) Whisper log-mel features.
            wav: (n, 480000) the raw 16 kHz chunks (BEATs computes its own fbank from them).
        Returns:
            (n, 1500, d_whisper + d_beats) in Whisper's dtype. BEATs' 1496 frames are zero-padded to 1500 at the end
            and concatenated by index, as the checkpoint was trained (the two streams are not time-aligned).
        """
        if mel.dim() != 3 or mel.shape[1] != WHISPER_MEL_FRAMES:
            raise InputError(f"mel must be (n, {WHISPER_MEL_FRAMES}, n_mels), got {tuple(mel.shape)}")
        if wav.dim() != 2 or wav.shape[0] != mel.shape[0]:
            raise InputError(f"wav must be (n, samples) with n={mel.shape[0]}, got {tuple(wav.shape)}")
        dtype = self.whisper_model.conv1.weight.dtype
        speech = self.whisper_model(mel.transpose(1, 2).to(dtype)).last_hidden_state  # (n, 1500, d_w)
        sounds = self.beats_model.extract_features(wav.float())  # (n, 1496, d_b), float32
        T = speech.shape[1]
        if sounds.shape[1] < T:
            sounds = F.pad(sounds, (0, 0, 0, T - sounds.shape[1]))  # (n, 1500, d_b)
        else:
            sounds = sounds[:, :T]
        return torch.cat([speech, sounds.to(dtype)], dim=-1)  # (n, 1500, d_w + d_b)
