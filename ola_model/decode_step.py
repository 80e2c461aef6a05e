"""A lean prefill and one-token decode step over transformers' ``Qwen2ForCausalLM`` parameters, for the serving
engine.

The decoder stays transformers' module (checkpoints and training use it); this is only the engine's hot path. At the
batch sizes of serving the decode step is bound by per-operation overhead, not arithmetic: on the tiny preset
transformers' forward spends about 1 ms per step of 8 rows in Python (cache objects, mask and position plumbing,
module calls), and this step does the same arithmetic in about half of that; a 60-token prefill takes 0.6 ms instead
of 1.0 (ad hoc, one thread). It reads the module's own parameters on every call (no copies, so a weight update is seen
at once) and keeps the cache as plain ``(keys, values)`` tensors per layer, laid out as transformers'
``DynamicCache`` lays them out ``(B, kv_heads, T, D)``.

Parity with transformers' forward (logits and cache, float32 and bfloat16, left-padded rows, prefill and decode) is
tested in ``tests/test_decode_step.py``. :func:`unsupported_reason` names any configuration this step does not
reproduce (another RoPE type, sliding windows, ...); the engine then keeps using transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KV = list[tuple[torch.Tensor, torch.Tensor]]


def unsupported_reason(llm: nn.Module) -> str | None:
    """Why :class:`DecodeStep` cannot stand in for ``llm``'s forward, or None when it can."""
    cfg = getattr(llm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "qwen2":
        return "not a transformers Qwen2 decoder"
    rotary = getattr(llm.model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") != "default":
        return "RoPE type is not 'default'"
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return "RoPE attention scaling is not 1"
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in (cfg.layer_types or [])):
        return "sliding-window attention"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    return None


class DecodeStep:
    """One decode step for a batch of rows, each at its own position, over a left-padded cache (``__call__``), and
    the prefill of left-padded prompts that builds such a cache (:meth:`prefill`).

    Args:
        llm: a transformers ``Qwen2ForCausalLM`` (``OlaModel.llm``) that :func:`unsupported_reason` accepts.
    """

    def __init__(self, llm: nn.Module) -> None:
        reason = unsupported_reason(llm)
        if reason:
            raise ValueError(f"DecodeStep cannot run this decoder: {reason}")
        cfg = llm.config
        self.llm = llm
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self._layers = []
        for layer in llm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self._layers.append(
                (
                    layer.input_layernorm.weight,
                    attn.q_proj,
                    attn.k_proj,
                    attn.v_proj,
                    attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    mlp.gate_proj.weight,
                    mlp.up_proj.weight,
                    mlp.down_proj.weight,
                )
            )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # transformers' Qwen2RMSNorm: normalise in float32, back to the input dtype, then scale
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def __call__(
        self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: KV
    ) -> tuple[torch.Tensor, KV]:
        """Decode one token per row.

        Args:
            token_ids: (B,) the last token of each row.
            positions: (B,) each row's position id for that token.
            mask: (B, T + 1) bool, True where a cache column (then the new token) is real for that row.
            kv: per layer, keys and values (B, kv_heads, T, head_dim).

        Returns:
            logits (B, V) of the next token, and the cache with this token appended (new tensors; ``kv`` is kept).
        """
        x = F.embedding(token_ids, self.llm.model.embed_tokens.weight)[:, None]  # (B, 1, C)
        return self._forward(x, positions[:, None], mask[:, None, None, :], kv)

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        """Run left-padded prompts through the decoder and build their cache.

        Args:
            embeds: (B, L, C) prompt embeddings, each row left-padded to L.
            mask: (B, L) 1 / True where the row's position is real (a padded row starts with zeros).

        Returns:
            logits (B, V) of each row's next token, and the cache, per layer ``(B, kv_heads, L, head_dim)``. Cache
            columns at padding positions hold finite values that no real position ever attends to.
        """
        L = embeds.shape[1]  # embeds (B, L, C)
        real = mask.bool()
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # as the engine numbers a left-padded row
        empty: list = [None] * len(self._layers)
        if bool(real.all()):  # no padding (one prompt, or prompts of one length): the causal kernel, no mask
            return self._forward(embeds, positions, None, empty)
        causal = torch.ones(L, L, dtype=torch.bool, device=embeds.device).tril()
        # A padding position attends to itself only: a query that sees no key at all would give NaN, and NaN in
        # the cache would leak through the zero attention weights of later steps.
        attn_mask = (causal & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=embeds.device)
        return self._forward(embeds, positions, attn_mask, empty)

    def _forward(
        self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None, kv: list
    ) -> tuple[torch.Tensor, KV]:
        """The decoder on T new positions per row: x (B, T, C), positions (B, T), attn_mask (B, 1, T, S) bool over
        the S = cache + T keys (None: plain causal attention, for an empty cache), kv per layer (keys, values) or
        None for an empty cache. Returns the last position's logits (B, V) and the cache with the T positions
        appended."""
        llm = self.llm
        B, T, _ = x.shape
        H, KVH, D = self.heads, self.kv_heads, self.head_dim
        half = D // 2
        freqs = positions.float()[..., None] * llm.model.rotary_emb.inv_freq  # (B, T, D/2), float32 as transformers
        angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (B, T, 1, D)
        cos = angles.cos().to(x.dtype)
        sin = angles.sin().to(x.dtype)
        # rotate_half(t) * sin == roll(t, D/2) * [-sin, +sin] on the two halves
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        out: KV = []
        for (w_in, q_proj, k_proj, v_proj, w_o, w_post, w_gate, w_up, w_down), cached in zip(
            self._layers, kv, strict=True
        ):
            h = self._norm(x, w_in)
            qk = torch.cat([q_proj(h), k_proj(h)], dim=-1).view(B, T, H + KVH, D)
            qk = qk * cos + qk.roll(half, dims=-1) * sin_signed
            q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
            keys = qk[:, :, H:].transpose(1, 2)  # (B, KVH, T, D)
            values = v_proj(h).view(B, T, KVH, D).transpose(1, 2)
            if cached is not None:
                keys = torch.cat([cached[0], keys], dim=2)
                values = torch.cat([cached[1], values], dim=2)
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=attn_mask, is_causal=attn_mask is None, scale=self.scale, enable_gqa=H != KVH
            )
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, H * D), w_o)
            h = self._norm(x, w_post)
            x = x + F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)
            out.append((keys, values))
        x = self._norm(x[:, -1], llm.model.norm.weight)
        return llm.lm_head(x), out
