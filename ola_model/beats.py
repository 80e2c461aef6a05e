"""BEATs audio encoder (iter3+, AS2M fine-tuned), as Ola uses it.

Kaldi fbank (n, T, 128) -> 16x16 patch embedding -> LayerNorm -> projection -> convolutional position embedding
-> post-LN transformer with deep-norm residuals and gated, bucketed relative position bias -> (n, T//16 * 8, C).

State-dict names follow the checkpoint (under ``model.speech_encoder.beats_model.``). The relative position
embedding lives only in layer 0 here; the original shares one module across layers, so checkpoints may repeat it
under every layer: :func:`normalize_beats_state_dict` folds those copies away.

The module always computes in float32, whatever the surrounding model's dtype or autocast state.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ola_model.config import BeatsConfig
from ola_model.errors import CheckpointError, InputError
from ola_model.processing.fbank import beats_fbank

_REL_BIAS_KEY = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight")


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Disable autocast on ``device`` so BEATs runs in float32 inside a bf16/fp16 autocast region."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style bidirectional bucket of each relative position (key index minus query index).

    Half the buckets serve each direction (positive offsets get ``+ num_buckets // 2``). Within a direction, offsets
    below ``max_exact = num_buckets // 4`` map to themselves, larger ones logarithmically up to ``max_distance``,
    clamped to the direction's last bucket.

    Args:
        relative_position: integer tensor of any shape.
        num_buckets: total buckets (320 for BEATs).
        max_distance: offset at which the logarithmic range ends (800 for BEATs).

    Returns:
        int64 tensor of the same shape, values in ``[0, num_buckets)``.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    max_exact = half // 2
    is_small = distance < max_exact
    # float32 and truncation exactly as the original, so bucket boundaries match; clamp avoids log(0) (masked anyway)
    scaled = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    if_large = max_exact + (scaled * (half - max_exact)).to(torch.long)
    if_large = torch.clamp(if_large, max=half - 1)
    return buckets + torch.where(is_small, distance, if_large)


class PositionalConv(nn.Module):
    """Convolutional position embedding: weight-normalised grouped Conv1d, "same" trim, GELU.

    ``weight_g`` (1, 1, K) and ``weight_v`` (C, C // groups, K) are plain parameters (checkpoint names); the
    weight is ``g * v / ||v||`` with the norm over all dims but the kernel dim (weight norm with ``dim=2``).
    """

    def __init__(self, dim: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.groups = groups
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim))

    def reset_parameters(self, dropout: float = 0.0) -> None:
        """The original init: normal v with std sqrt(4 (1 - dropout) / (K C)), g = ||v||, zero bias."""
        dim = self.weight_v.shape[0]
        std = math.sqrt(4.0 * (1.0 - dropout) / (self.kernel_size * dim))
        with torch.no_grad():
            nn.init.normal_(self.weight_v, mean=0.0, std=std)
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))
            nn.init.zeros_(self.bias)

    def weight(self) -> torch.Tensor:
        """The effective conv weight, (C, C // groups, K)."""
        norm = self.weight_v.norm(dim=(0, 1), keepdim=True)  # (1, 1, K)
        return self.weight_g * self.weight_v / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, C, T) -> (n, C, T)."""
        out = F.conv1d(x, self.weight(), self.bias, padding=self.kernel_size // 2, groups=self.groups)
        if self.kernel_size % 2 == 0:
            out = out[:, :, :-1]  # an even kernel with K//2 padding yields T + 1 steps: drop the last ("SamePad")
        return F.gelu(out)


class BeatsAttention(nn.Module):
    """Multi-head self-attention with a bucketed relative position bias, gated per query (``gru_rel_pos``).

    Only the layer that owns ``relative_attention_bias`` computes the bias; it returns the un-gated bias so later
    layers can reuse it with their own gates.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_buckets: int,
        max_distance: int,
        has_relative_attention_bias: bool,
        gru_rel_pos: bool,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads) if has_relative_attention_bias else None
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def compute_bias(self, query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
        """Relative position bias (heads, query_length, key_length) from this layer's embedding."""
        if self.relative_attention_bias is None:
            raise RuntimeError("this attention layer has no relative_attention_bias; pass the bias of layer 0")
        context = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        buckets = relative_position_bucket(memory - context, self.num_buckets, self.max_distance)  # (Tq, Tk)
        values = self.relative_attention_bias(buckets)  # (Tq, Tk, H)
        return values.permute(2, 0, 1)  # (H, Tq, Tk)

    def forward(
        self, x: torch.Tensor, position_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over time.

        Args:
            x: (n, T, C) float32.
            position_bias: (H, T, T) un-gated bias from layer 0, or None to compute it here.

        Returns:
            (n, T, C) output and the un-gated (H, T, T) bias (None without relative positions).
        """
        n, seq, dim = x.shape
        q = self.q_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (n, H, T, D), unscaled
        k = self.k_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (n, H, T, D)
        v = self.v_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (n, H, T, D)

        if position_bias is None and self.relative_attention_bias is not None:
            position_bias = self.compute_bias(seq, seq, x.device)

        attn_bias = None
        if position_bias is not None:
            if self.gru_rel_pos:
                # two sigmoid gates per query and head from the unscaled query: bias scale in (1, 1 + grep_a)
                gates = torch.sigmoid(self.grep_linear(q).view(n, self.num_heads, seq, 2, 4).sum(-1))  # (n, H, T, 2)
                gate_a, gate_b = gates.chunk(2, dim=-1)  # (n, H, T, 1) each
                gate_a_1 = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
                attn_bias = gate_a_1 * position_bias  # (n, H, T, T)
            else:
                attn_bias = position_bias.unsqueeze(0)  # (1, H, T, T)

        # scores = q k^T / sqrt(D) + bias, softmax over keys in float32 (the module runs in float32)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_bias,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.head_dim**-0.5,
        )  # (n, H, T, D)
        out = out.transpose(1, 2).reshape(n, seq, dim)  # (n, T, C)
        return self.out_proj(out), position_bias


class BeatsLayer(nn.Module):
    """Post-LN transformer layer with deep-norm residual scaling ``alpha``."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        num_buckets: int,
        max_distance: int,
        has_relative_attention_bias: bool,
        gru_rel_pos: bool,
        deep_norm_alpha: float,
        layer_norm_eps: float = 1e-5,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = BeatsAttention(
            dim,
            num_heads,
            num_buckets=num_buckets,
            max_distance=max_distance,
            has_relative_attention_bias=has_relative_attention_bias,
            gru_rel_pos=gru_rel_pos,
            attention_dropout=attention_dropout,
        )
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.alpha = deep_norm_alpha
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(
        self, x: torch.Tensor, position_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (n, T, C) -> (n, T, C), and the un-gated relative position bias (H, T, T) for the next layer."""
        residual = x
        x, position_bias = self.self_attn(x, position_bias)
        x = residual * self.alpha + self.dropout(x)
        x = self.self_attn_layer_norm(x)
        residual = x
        x = self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))
        x = residual * self.alpha + self.dropout(x)
        x = self.final_layer_norm(x)
        return x, position_bias


class BeatsEncoder(nn.Module):
    """Convolutional position embedding, LayerNorm (``layer_norm_first=False``: before the layers), the layers."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_layers: int,
        num_heads: int,
        *,
        conv_pos: int,
        conv_pos_groups: int,
        num_buckets: int,
        max_distance: int,
        gru_rel_pos: bool,
        deep_norm: bool,
        layer_norm_first: bool,
        layer_norm_eps: float = 1e-5,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.0,
    ) -> None:
        super().__init__()
        if layer_norm_first:
            raise ValueError("BEATs with layer_norm_first=True (pre-LN) is not supported; Ola's checkpoint is post-LN")
        self.pos_conv = nn.Sequential(PositionalConv(dim, conv_pos, conv_pos_groups))
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.layerdrop = layerdrop
        alpha = (2.0 * num_layers) ** 0.25 if deep_norm else 1.0
        self.layers = nn.ModuleList(
            BeatsLayer(
                dim,
                ffn_dim,
                num_heads,
                num_buckets=num_buckets,
                max_distance=max_distance,
                has_relative_attention_bias=(i == 0),
                gru_rel_pos=gru_rel_pos,
                deep_norm_alpha=alpha,
                layer_norm_eps=layer_norm_eps,
                dropout=dropout,
                attention_dropout=attention_dropout,
                activation_dropout=activation_dropout,
            )
            for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, T, C) -> (n, T, C)."""
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # conv over time on (n, C, T)
        x = self.layer_norm(x)
        x = self.dropout(x)
        position_bias = None
        for layer in self.layers:
            # layer 0 always runs in training too: it computes the shared relative position bias
            if self.training and position_bias is not None and torch.rand(()).item() < self.layerdrop:
                continue
            x, position_bias = layer(x, position_bias)
        return x


class Beats(nn.Module):
    """The BEATs encoder: fbank (n, T, mel) -> features (n, T // patch * mel // patch, encoder_embed_dim).

    Built from plain numbers (use :meth:`from_config` for a :class:`BeatsConfig`); construction reads no files and
    works under ``torch.device("meta")``.
    """

    def __init__(
        self,
        *,
        num_mel_bins: int = 128,
        patch_size: int = 16,
        embed_dim: int = 512,
        encoder_embed_dim: int = 768,
        encoder_layers: int = 12,
        encoder_attention_heads: int = 12,
        encoder_ffn_embed_dim: int = 3072,
        conv_pos: int = 128,
        conv_pos_groups: int = 16,
        num_buckets: int = 320,
        max_distance: int = 800,
        gru_rel_pos: bool = True,
        deep_norm: bool = True,
        layer_norm_first: bool = False,
        num_classes: int = 527,
        layer_norm_eps: float = 1e-5,
        fbank_mean: float = 15.41663,
        fbank_std: float = 6.55582,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_mel_bins % patch_size:
            raise ValueError(f"num_mel_bins {num_mel_bins} is not divisible by patch_size {patch_size}")
        self.num_mel_bins = num_mel_bins
        self.patch_size = patch_size
        self.encoder_embed_dim = encoder_embed_dim
        self.encoder_layers = encoder_layers
        self.deep_norm = deep_norm
        self.fbank_mean = fbank_mean
        self.fbank_std = fbank_std
        self.dropout = dropout

        self.patch_embedding = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.layer_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        # as in the original, the projection exists only when the widths differ
        self.post_extract_proj = nn.Linear(embed_dim, encoder_embed_dim) if embed_dim != encoder_embed_dim else None
        self.encoder = BeatsEncoder(
            encoder_embed_dim,
            encoder_ffn_embed_dim,
            encoder_layers,
            encoder_attention_heads,
            conv_pos=conv_pos,
            conv_pos_groups=conv_pos_groups,
            num_buckets=num_buckets,
            max_distance=max_distance,
            gru_rel_pos=gru_rel_pos,
            deep_norm=deep_norm,
            layer_norm_first=layer_norm_first,
            layer_norm_eps=layer_norm_eps,
            dropout=dropout,
            attention_dropout=attention_dropout,
            activation_dropout=activation_dropout,
            layerdrop=layerdrop,
        )
        # the AS2M classifier: loadable, unused by Ola's forward
        self.predictor = nn.Linear(encoder_embed_dim, num_classes) if num_classes > 0 else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: BeatsConfig, **kwargs: float) -> Beats:
        """Build from a :class:`BeatsConfig`; ``kwargs`` set the dropout rates (all 0.0 by default)."""
        return cls(
            num_mel_bins=cfg.num_mel_bins,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            encoder_embed_dim=cfg.encoder_embed_dim,
            encoder_layers=cfg.encoder_layers,
            encoder_attention_heads=cfg.encoder_attention_heads,
            encoder_ffn_embed_dim=cfg.encoder_ffn_embed_dim,
            conv_pos=cfg.conv_pos,
            conv_pos_groups=cfg.conv_pos_groups,
            num_buckets=cfg.num_buckets,
            max_distance=cfg.max_distance,
            gru_rel_pos=cfg.gru_rel_pos,
            deep_norm=cfg.deep_norm,
            layer_norm_first=cfg.layer_norm_first,
            num_classes=cfg.num_classes,
            layer_norm_eps=cfg.layer_norm_eps,
            fbank_mean=cfg.fbank_mean,
            fbank_std=cfg.fbank_std,
            **kwargs,
        )

    def reset_parameters(self) -> None:
        """Linear weights normal(0.02), biases zero, LayerNorms identity, grep_a ones, deep-norm beta scaling."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, BeatsAttention) and module.gru_rel_pos:
                nn.init.ones_(module.grep_a)
            elif isinstance(module, PositionalConv):
                module.reset_parameters(self.dropout)
        nn.init.kaiming_uniform_(self.patch_embedding.weight, a=math.sqrt(5))  # the Conv2d default
        if self.deep_norm:
            beta = (8.0 * self.encoder_layers) ** -0.25  # DeepNet: shrink the value / output / FFN weights
            with torch.no_grad():
                for layer in self.encoder.layers:
                    for linear in (layer.fc1, layer.fc2, layer.self_attn.v_proj, layer.self_attn.out_proj):
                        linear.weight.mul_(beta)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """Encode normalised fbank features.

        Args:
            fbank: (n, T, num_mel_bins), from :func:`ola_model.processing.fbank.beats_fbank`; T = 2998 for 30 s.

        Returns:
            (n, (T // patch_size) * (num_mel_bins // patch_size), encoder_embed_dim) float32; (n, 1496, 768)
            for 30 s chunks. Time-major: the frequency patches of one time step are adjacent.
        """
        if fbank.dim() != 3 or fbank.shape[2] != self.num_mel_bins:
            raise InputError(f"BEATs fbank must be (n, T, {self.num_mel_bins}), got shape {list(fbank.shape)}")
        if fbank.shape[1] < self.patch_size:
            raise InputError(f"BEATs fbank has {fbank.shape[1]} frames, fewer than one {self.patch_size}-frame patch")
        with _no_autocast(fbank.device):
            x = fbank.to(torch.float32).unsqueeze(1)  # (n, 1, T, F)
            x = self.patch_embedding(x)  # (n, E, T // p, F // p)
            x = x.flatten(2).transpose(1, 2)  # (n, (T // p) * (F // p), E): time-major patches
            x = self.layer_norm(x)
            if self.post_extract_proj is not None:
                x = self.post_extract_proj(x)  # (n, L, C)
            x = F.dropout(x, self.dropout, self.training)
            return self.encoder(x)

    def extract_features(self, waveform_chunks: torch.Tensor) -> torch.Tensor:
        """Encode raw 16 kHz audio chunks.

        Args:
            waveform_chunks: (n, samples) float waveforms in [-1, 1]; samples = 480000 for 30 s chunks.

        Returns:
            (n, L, encoder_embed_dim) float32; L = 1496 for 30 s chunks.
        """
        if waveform_chunks.dim() != 2:
            raise InputError(f"BEATs waveform_chunks must be (n, samples), got shape {list(waveform_chunks.shape)}")
        with _no_autocast(waveform_chunks.device):
            fbank = beats_fbank(waveform_chunks, self.fbank_mean, self.fbank_std, self.num_mel_bins)  # (n, T, F)
        return self(fbank)


def normalize_beats_state_dict(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Fold the per-layer copies of the shared relative position embedding into layer 0's key.

    The original BEATs shares layer 0's ``relative_attention_bias`` with every layer, so its checkpoints may store
    ``{prefix}encoder.layers.{i}.self_attn.relative_attention_bias.weight`` for every ``i``. This module has it in
    layer 0 only. Copies for ``i > 0`` must equal layer 0's and are dropped.

    Args:
        sd: a state dict (not modified).
        prefix: the prefix of the BEATs keys in ``sd``, e.g. ``"model.speech_encoder.beats_model."``.

    Returns:
        A new dict without the per-layer copies.

    Raises:
        CheckpointError: a copy differs from layer 0's, or copies exist without layer 0's key.
    """
    pattern = re.compile(re.escape(prefix) + _REL_BIAS_KEY.pattern)
    layer0_key = f"{prefix}encoder.layers.0.self_attn.relative_attention_bias.weight"
    copies = [key for key in sd if (match := pattern.fullmatch(key)) and int(match.group(1)) > 0]
    if not copies:
        return dict(sd)
    if layer0_key not in sd:
        raise CheckpointError(
            "BEATs checkpoint has per-layer relative_attention_bias copies but not layer 0's", missing=[layer0_key]
        )
    reference = sd[layer0_key]
    for key in copies:
        value = sd[key]
        if value.shape != reference.shape or not torch.equal(value, reference):
            raise CheckpointError(f"BEATs checkpoint key {key} differs from {layer0_key}; the embedding must be shared")
    dropped = set(copies)
    return {key: value for key, value in sd.items() if key not in dropped}
