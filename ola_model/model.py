"""The Ola model: encoders, projectors and the Qwen2.5 decoder, composed.

:class:`OlaModel` holds the parts as named submodules and offers one entry point per modality, each returning an
LLM-width *embedding block* (begin / sep / newline / end vectors included), plus the decoder step. Assembling blocks
into a prompt is :mod:`ola_model.prompt`; decoding loops are :mod:`ola_model.generation`.

Internal parameter names differ from the published checkpoint's only by the explicit maps in
:mod:`ola_model.checkpoint.name_map`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from ola_model.audio_encoder import DualAudioEncoder
from ola_model.config import LLMConfig, OlaConfig
from ola_model.errors import InputError
from ola_model.projector import SpeechProjector, VisionProjector
from ola_model.vision import OryxViT

log = logging.getLogger(__name__)

# Parts that stay float32 whatever dtype the rest of the model uses (BEATs was trained and stored in fp32).
FP32_PARTS = ("speech_encoder.beats_model",)

PARTS = ("llm", "vision_tower", "mm_projector", "whisper", "beats", "speech_projector")


def qwen2_config(cfg: LLMConfig) -> Qwen2Config:
    """The transformers config of the decoder: RoPE theta 1e6, no rope scaling, q/k/v biases, untied head."""
    hf = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
        initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    hf._attn_implementation = "sdpa"
    return hf


class OlaModel(nn.Module):
    """Ola: OryxViT + OlaMLP projector, Whisper || BEATs + speech projector, Qwen2.5 decoder."""

    def __init__(self, config: OlaConfig) -> None:
        super().__init__()
        self.config = config
        v, llm = config.vision, config.llm
        self.llm = Qwen2ForCausalLM(qwen2_config(llm))
        self.vision_tower = OryxViT(
            dim=v.hidden_size,
            depth=v.num_layers,
            num_heads=v.num_heads,
            mlp_dim=v.mlp_dim,
            patch_size=v.patch_size,
            in_channels=v.num_channels,
            pos_grid=v.pos_grid,
            eps=v.layer_norm_eps,
        )
        self.mm_projector = VisionProjector(v.hidden_size, llm.hidden_size, config.projector.pool_window)
        self.speech_encoder = DualAudioEncoder(config.whisper, config.beats)
        self.speech_projector = SpeechProjector(
            config.speech_encoder_hidden_size,
            llm.hidden_size,
            ds_rate=config.projector.speech_ds_rate,
            hidden=config.projector.speech_hidden_size,
        )

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    def part_modules(self) -> dict[str, nn.Module]:
        """The model's parts by name, as training stages freeze and train them."""
        return {
            "llm": self.llm,
            "vision_tower": self.vision_tower,
            "mm_projector": self.mm_projector,
            "whisper": self.speech_encoder.whisper_model,
            "beats": self.speech_encoder.beats_model,
            "speech_projector": self.speech_projector,
        }

    def part_num_params(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.part_modules().items()}

    # ------------------------------------------------------------------------------------------------ encoders
    def encode_images(self, views: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Images -> one embedding block per image.

        Args:
            views: per image, its (low-res (3, h, w), high-res (3, H, W)) normalised views; sides multiples of 32.
        Returns:
            per image a (3 + (h/32)(w/32 + 1) + (H/32)(W/32 + 1), C_llm) block:
            begin · low-res rows · sep · high-res rows · end, every pooled row ending in a newline vector.
        """
        flat = [view for pair in views for view in pair]
        features = self.vision_tower(flat)  # per view (h*w, C_vit)
        p = self.vision_tower.patch_size
        projected = []
        for view, feats in zip(flat, features, strict=True):
            h, w = -(-view.shape[-2] // p), -(-view.shape[-1] // p)
            projected.append(self.mm_projector(feats[None], h, w)[0])  # (h/2 * (w/2 + 1), C)
        return [self.mm_projector.image_block(projected[2 * i], projected[2 * i + 1]) for i in range(len(views))]

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Video frames (T, 3, H, W) -> one block of 2 + T((H/32)(W/32 + 1) + 1) positions. Every frame is used."""
        if frames.dim() != 4 or frames.shape[0] == 0:
            raise InputError(f"video frames must be (T>0, 3, H, W), got {tuple(frames.shape)}")
        T = frames.shape[0]
        p = self.vision_tower.patch_size
        h, w = -(-frames.shape[-2] // p), -(-frames.shape[-1] // p)
        features = torch.stack(self.vision_tower(frames))  # (T, h*w, C_vit)
        projected = self.mm_projector(features, h, w)  # (T, h/2 * (w/2 + 1), C)
        return self.mm_projector.video_block(projected.reshape(T, -1, projected.shape[-1]))

    def encode_audio(self, mel: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        """One clip's 30 s chunks: mel (n, 3000, 128), wav (n, 480000) -> a block of 2 + 151 n positions."""
        fused = self.speech_encoder(mel, wav)  # (n, 1500, d_w + d_b)
        return self.speech_projector(fused.to(self.speech_projector.linear1.weight.dtype))

    # ------------------------------------------------------------------------------------------------- decoder
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.embed_tokens(ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ):
        """One decoder pass over embeddings (B, L, C) -> transformers ``CausalLMOutputWithPast`` (logits (B, L', V))."""
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )

    def reset_nonpersistent_buffers(self) -> None:
        """Recompute buffers that are not stored in checkpoints (RoPE frequencies) on the model's device.

        Needed after ``to_empty`` (building on the meta device and then loading weights).
        """
        with torch.device(self.device):
            self.llm.model.rotary_emb = Qwen2RotaryEmbedding(config=self.llm.config)


def build_model(
    config: OlaConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> OlaModel:
    """Build Ola from a config without reading any file.

    Args:
        config: the model config (``OlaConfig.from_name("ola-7b")``, ``"tiny"``, or loaded).
        device: where to allocate; ``"meta"`` builds shapes only (ola-7b in well under a second).
        dtype: parameter dtype of every part except BEATs, which stays float32.
        seed: seeds the random initialisation, for reproducible tiny models.
    Returns:
        the model in eval mode.
    """
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = OlaModel(config)
    model.to(dtype)
    for name in FP32_PARTS:
        model.get_submodule(name).float()
    return model.eval()
