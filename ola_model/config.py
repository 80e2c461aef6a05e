"""Configuration of the Ola model: one dataclass per sub-model, composed in :class:`OlaConfig`.

Every config is a plain dataclass of numbers and strings, so it serialises to nested JSON and back without loss.
``OlaConfig.from_name("ola-7b")`` gives exactly the published dimensions (see the reference
``ola-architecture.md`` §1.3); ``"tiny"`` has the same structure at toy size for tests and demos.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class VisionConfig:
    """OryxViT: a SigLIP-so400m-shaped ViT with 16-pixel patches and a resizable 2-D position table."""

    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304  # int(1152 * 3.7362)
    patch_size: int = 16
    num_channels: int = 3
    pos_grid: int = 128  # the learned position table covers pos_grid x pos_grid patches
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclass
class WhisperConfig:
    """The Whisper-large-v3 audio encoder (encoder only)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500  # 3000 mel frames (30 s) after the stride-2 convolution

    def __post_init__(self) -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"whisper.d_model {self.d_model} is not divisible by {self.encoder_attention_heads} heads")


@dataclass
class BeatsConfig:
    """BEATs (iter3+, AS2M fine-tuned): Kaldi fbank -> 16x16 patches -> deep-norm transformer."""

    num_mel_bins: int = 128
    patch_size: int = 16
    embed_dim: int = 512  # patch embedding width
    encoder_embed_dim: int = 768
    encoder_layers: int = 12
    encoder_attention_heads: int = 12
    encoder_ffn_embed_dim: int = 3072
    conv_pos: int = 128  # kernel of the convolutional position embedding
    conv_pos_groups: int = 16
    num_buckets: int = 320  # relative position buckets
    max_distance: int = 800
    gru_rel_pos: bool = True
    deep_norm: bool = True
    layer_norm_first: bool = False
    num_classes: int = 527  # the AS2M classifier head ("predictor"); 0 = no head
    layer_norm_eps: float = 1e-5
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582

    def __post_init__(self) -> None:
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError("beats.encoder_embed_dim is not divisible by encoder_attention_heads")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError("beats.encoder_embed_dim is not divisible by conv_pos_groups")


@dataclass
class ProjectorConfig:
    """The vision projector (``OlaMLP`` with local-global pooling) and the speech projector."""

    vision_type: Literal["ola_mlp"] = "ola_mlp"
    pool_window: int = 2  # 2x2 local-global attention pooling
    speech_type: Literal["linear"] = "linear"
    speech_ds_rate: int = 10  # frames stacked by the speech projector
    speech_hidden_size: int = 2048  # width of linear1's output (= fused encoder width in Ola-7b)


@dataclass
class LLMConfig:
    """The Qwen2.5 decoder."""

    vocab_size: int = 152064  # rows of embed_tokens / lm_head in the checkpoint
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("llm.hidden_size is not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("llm.num_attention_heads is not divisible by num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LimitsConfig:
    """Input limits. Over a limit is a clear error (``ola_model.errors``), never a silent truncation."""

    max_context: int = 16384  # tokenizer_model_max_length: embeddings per sequence, prompt + generation
    max_audio_chunks: int = 25  # 30 s chunks: 12.5 min of audio
    max_video_frames: int = 64  # frames sampled uniformly from a video
    max_image_area: int = 1536 * 1536
    lowres_area: int = 384 * 384
    image_stride: int = 32
    video_max_area: int = 480 * 480
    video_min_area: int = 288 * 288
    video_stride: int = 64  # the official inference value (training used 32)


_SUBCONFIGS: dict[str, type] = {
    "vision": VisionConfig,
    "whisper": WhisperConfig,
    "beats": BeatsConfig,
    "projector": ProjectorConfig,
    "llm": LLMConfig,
    "limits": LimitsConfig,
}


@dataclass
class OlaConfig:
    """The whole Ola model: sub-configs plus the tokenizer size the checkpoint was trained with."""

    name: str = "ola-7b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    whisper: WhisperConfig = field(default_factory=WhisperConfig)
    beats: BeatsConfig = field(default_factory=BeatsConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # len(tokenizer): logits at ids >= this are never sampled (the checkpoint has vocab_size >= this rows).
    tokenizer_vocab_size: int = 151670

    def __post_init__(self) -> None:
        if self.tokenizer_vocab_size > self.llm.vocab_size:
            raise ValueError(
                f"tokenizer_vocab_size {self.tokenizer_vocab_size} exceeds llm.vocab_size {self.llm.vocab_size}"
            )

    # Derived widths: leaf modules take these numbers, not the config.
    @property
    def speech_encoder_hidden_size(self) -> int:
        """Channels of the fused Whisper || BEATs features (2048 for Ola-7b)."""
        return self.whisper.d_model + self.beats.encoder_embed_dim

    @classmethod
    def from_name(cls, name: str) -> OlaConfig:
        """A preset by name: ``"ola-7b"`` (the published model) or ``"tiny"`` (toy size, same structure)."""
        if name not in PRESETS:
            raise KeyError(f"unknown Ola preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name]()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OlaConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown OlaConfig keys: {sorted(unknown)}")
        for key, sub_cls in _SUBCONFIGS.items():
            if key in data and isinstance(data[key], dict):
                sub_known = {f.name for f in dataclasses.fields(sub_cls)}
                sub_unknown = set(data[key]) - sub_known
                if sub_unknown:
                    raise ValueError(f"unknown {key} config keys: {sorted(sub_unknown)}")
                data[key] = sub_cls(**data[key])
        return cls(**data)

    def with_overrides(self, overrides: dict[str, Any]) -> OlaConfig:
        """A copy with some fields replaced: ``{"llm": {"hidden_size": 128}, "name": "tiny-demo"}``.

        Raises:
            ValueError: an unknown key (named) or a sub-config given as a non-mapping.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            if key in _SUBCONFIGS:
                if not isinstance(value, dict):
                    raise ValueError(f"override {key!r} must be a mapping of {key} config keys, got {value!r}")
                sub = dict(data[key])
                unknown = set(value) - set(sub)
                if unknown:
                    raise ValueError(f"unknown {key} config keys: {sorted(unknown)}")
                sub.update(value)
                data[key] = sub
            elif key in data:
                data[key] = value
            else:
                raise ValueError(f"unknown OlaConfig keys: [{key!r}]")
        return OlaConfig.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OlaConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> OlaConfig:
        return cls.from_json(Path(path).read_text())


def _ola_7b() -> OlaConfig:
    return OlaConfig(name="ola-7b")


def _tiny() -> OlaConfig:
    """Toy size, same structure: every module, every key family, the same token layouts and limits."""
    return OlaConfig(
        name="tiny",
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, pos_grid=32),
        # openai-whisper MLPs are always 4 d wide
        whisper=WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128),
        beats=BeatsConfig(
            embed_dim=16,
            encoder_embed_dim=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_embed_dim=64,
            conv_pos=16,
            conv_pos_groups=4,
            num_classes=5,
        ),
        projector=ProjectorConfig(speech_hidden_size=64),
        llm=LLMConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16384,
            # special-token ids of the shipped tiny tokenizer (ola_model/assets/tiny-tokenizer)
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
        ),
        tokenizer_vocab_size=1000,
    )


PRESETS = {"ola-7b": _ola_7b, "tiny": _tiny}
