"""Explicit name maps between :class:`~ola_model.model.OlaModel` parameters and checkpoint layouts.

One map per checkpoint family. Each takes an internal parameter name and returns the name that family stores it
under (or ``None`` where the family does not store it). The reverse direction is always derived by inverting the map
over the model's own key set, so a key is either mapped on purpose or reported as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

# transformers WhisperEncoder -> openai-whisper AudioEncoder, per-layer suffixes.
_WHISPER_LAYER = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_WHISPER_TOP = {
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "embed_positions.weight": "positional_embedding",
    "layer_norm.weight": "ln_post.weight",
    "layer_norm.bias": "ln_post.bias",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def whisper_hf_to_openai(name: str) -> str:
    """A transformers ``WhisperEncoder`` key -> the openai-whisper ``AudioEncoder`` key."""
    if name in _WHISPER_TOP:
        return _WHISPER_TOP[name]
    m = _LAYER_RE.match(name)
    if m is None or m.group(2) not in _WHISPER_LAYER:
        raise KeyError(f"no openai-whisper name for WhisperEncoder key {name!r}")
    return f"blocks.{m.group(1)}.{_WHISPER_LAYER[m.group(2)]}.{m.group(3)}"


# Internal prefix -> (published Ola checkpoint prefix, per-key rename inside the family).
_OLA_FAMILIES: list[tuple[str, str, Callable[[str], str]]] = [
    ("llm.model.", "model.", lambda k: k),
    ("llm.lm_head.", "lm_head.", lambda k: k),
    ("vision_tower.", "model.vision_tower.vision_tower.", lambda k: k),
    ("mm_projector.", "model.mm_projector.", lambda k: k),
    ("speech_encoder.whisper_model.", "model.speech_encoder.whisper_model.", whisper_hf_to_openai),
    ("speech_encoder.beats_model.", "model.speech_encoder.beats_model.", lambda k: k),
    ("speech_projector.", "model.speech_projector.", lambda k: k),
]


def ola_checkpoint_name(name: str) -> str:
    """Internal parameter name -> its key in the published Ola-7b checkpoint (``OlaQwenForCausalLM``)."""
    for internal, published, rename in _OLA_FAMILIES:
        if name.startswith(internal):
            return published + rename(name.removeprefix(internal))
    raise KeyError(f"parameter {name!r} belongs to no checkpoint family")


# Component checkpoints that stage-1 training starts from: internal prefix -> rename of the remainder.
def qwen_checkpoint_name(name: str) -> str | None:
    """Internal name -> key in an HF Qwen2.5 directory (``Qwen2ForCausalLM``); None outside the LLM."""
    return name.removeprefix("llm.") if name.startswith("llm.") else None


def whisper_openai_checkpoint_name(name: str) -> str | None:
    """Internal name -> key in an openai-whisper ``.pt`` (``model_state_dict``, encoder under ``encoder.``)."""
    prefix = "speech_encoder.whisper_model."
    return "encoder." + whisper_hf_to_openai(name.removeprefix(prefix)) if name.startswith(prefix) else None


def whisper_hf_checkpoint_name(name: str) -> str | None:
    """Internal name -> key in an HF Whisper directory (``WhisperForConditionalGeneration``)."""
    prefix = "speech_encoder.whisper_model."
    return "model.encoder." + name.removeprefix(prefix) if name.startswith(prefix) else None


def beats_checkpoint_name(name: str) -> str | None:
    """Internal name -> key in a BEATs ``.pt`` (``model`` entry)."""
    prefix = "speech_encoder.beats_model."
    return name.removeprefix(prefix) if name.startswith(prefix) else None


def vit_checkpoint_name(name: str) -> str | None:
    """Internal name -> key in an OryxViT / SigLIP-shaped timm ``.pth``."""
    prefix = "vision_tower."
    return name.removeprefix(prefix) if name.startswith(prefix) else None


def build_map(names: Iterable[str], rename: Callable[[str], str | None]) -> dict[str, str]:
    """Checkpoint key -> internal name over ``names``, failing loudly if two parameters map to one key."""
    inverse: dict[str, str] = {}
    for name in names:
        key = rename(name)
        if key is None:
            continue
        if key in inverse:
            raise KeyError(f"parameters {inverse[key]!r} and {name!r} both map to checkpoint key {key!r}")
        inverse[key] = name
    return inverse
