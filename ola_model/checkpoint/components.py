"""Loading the component checkpoints that stage-1 training starts from, each into its part of an OlaModel.

* an HF Qwen2.5 directory (``config.json`` + safetensors) -> ``llm``
* a Whisper checkpoint: openai-whisper ``.pt`` or an HF directory -> ``speech_encoder.whisper_model``
* a BEATs ``.pt`` (``{"cfg", "model"}``) -> ``speech_encoder.beats_model``
* an OryxViT / SigLIP-shaped timm ``.pth`` -> ``vision_tower``

Each load is strict for its part: every key of the part must be present with its shape, every key in the file must
map to the part or be dropped on purpose by an explicit rule (e.g. Whisper's decoder), and the report says which.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ola_model.beats import normalize_beats_state_dict
from ola_model.checkpoint import name_map
from ola_model.checkpoint.ola_format import INDEX_FILE, SINGLE_FILE, checkpoint_sources
from ola_model.checkpoint.strict import LoadReport, TensorSource, assign_strict, named_tensors, tensor_source
from ola_model.errors import CheckpointError
from ola_model.model import OlaModel

log = logging.getLogger(__name__)


def _part_names(model: OlaModel, prefix: str) -> list[str]:
    return [n for n in named_tensors(model) if n.startswith(prefix)]


def _torch_load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        # weights_only: never execute pickled code from a checkpoint; mmap: no second copy in memory
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # mmap needs the zip format; legacy files load without it
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt / non-zip / unsafe files
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc


def _check_dims(what: str, found: dict[str, int], want: dict[str, int]) -> None:
    wrong = {k: (found[k], v) for k, v in want.items() if k in found and found[k] != v}
    if wrong:
        detail = ", ".join(f"{k}={got} (model needs {need})" for k, (got, need) in wrong.items())
        raise CheckpointError(f"{what}: dimensions do not match the model config: {detail}")


def _load_part(
    model: OlaModel,
    sources: dict[str, TensorSource],
    prefix: str,
    rename: Callable[[str], str | None],
    skip: Callable[[str], str | None],
    what: str,
) -> LoadReport:
    names = _part_names(model, prefix)
    key_to_param = name_map.build_map(names, rename)
    report = assign_strict(model, sources, key_to_param, names, skip=skip, what=what)
    log.info("%s: loaded %d tensors, skipped %d on purpose", what, report.loaded, len(report.skipped))
    return report


# ------------------------------------------------------------------------------------------------------- Qwen2.5
def load_qwen(model: OlaModel, path: str | Path) -> LoadReport:
    """An HF Qwen2.5 directory -> the LLM. A tied-embedding model's head is copied from its embeddings."""
    path = Path(path)
    cfg = _read_json(path / "config.json")
    llm = model.config.llm
    _check_dims(
        str(path),
        cfg,
        {
            "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_hidden_layers,
            "num_attention_heads": llm.num_attention_heads,
            "num_key_value_heads": llm.num_key_value_heads,
            "vocab_size": llm.vocab_size,
        },
    )
    sources = checkpoint_sources(path)
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in sources and "model.embed_tokens.weight" in sources:
        sources["lm_head.weight"] = sources["model.embed_tokens.weight"]
    return _load_part(model, sources, "llm.", name_map.qwen_checkpoint_name, lambda k: None, str(path))


# ------------------------------------------------------------------------------------------------------- Whisper
def load_whisper(model: OlaModel, path: str | Path) -> LoadReport:
    """An openai-whisper ``.pt`` (e.g. ``large-v3.pt``) or an HF Whisper directory -> the Whisper encoder."""
    path = Path(path)
    w = model.config.whisper
    if path.is_dir():
        cfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
        want = {
            "num_mel_bins": w.num_mel_bins,
            "d_model": w.d_model,
            "encoder_layers": w.encoder_layers,
            "encoder_attention_heads": w.encoder_attention_heads,
        }
        _check_dims(str(path), cfg, want)
        sources = checkpoint_sources(path)

        def skip(key: str) -> str | None:
            if key.startswith("model.decoder.") or key == "proj_out.weight":
                return "Whisper decoder (Ola uses the encoder only)"
            return None

        return _load_part(
            model, sources, "speech_encoder.whisper_model.", name_map.whisper_hf_checkpoint_name, skip, str(path)
        )
    data = _torch_load(path)
    if "model_state_dict" not in data:
        raise CheckpointError(f"{path}: not an openai-whisper checkpoint (no 'model_state_dict')")
    dims = data.get("dims", {})
    _check_dims(
        str(path),
        dims,
        {
            "n_mels": w.num_mel_bins,
            "n_audio_state": w.d_model,
            "n_audio_layer": w.encoder_layers,
            "n_audio_head": w.encoder_attention_heads,
            "n_audio_ctx": w.max_source_positions,
        },
    )
    if "n_audio_state" in dims and 4 * dims["n_audio_state"] != w.encoder_ffn_dim:
        raise CheckpointError(
            f"{path}: openai-whisper MLPs are 4 x n_audio_state = {4 * dims['n_audio_state']} wide, "
            f"but the model config has whisper.encoder_ffn_dim={w.encoder_ffn_dim}"
        )
    sources = {k: tensor_source(v) for k, v in data["model_state_dict"].items()}

    def skip_openai(key: str) -> str | None:
        return "Whisper decoder (Ola uses the encoder only)" if key.startswith("decoder.") else None

    return _load_part(
        model, sources, "speech_encoder.whisper_model.", name_map.whisper_openai_checkpoint_name, skip_openai, str(path)
    )


# --------------------------------------------------------------------------------------------------------- BEATs
def load_beats(model: OlaModel, path: str | Path) -> LoadReport:
    """A BEATs ``.pt`` (``{"cfg": ..., "model": state_dict}``) -> BEATs. The shared relative bias may be per layer."""
    path = Path(path)
    data = _torch_load(path)
    if "model" not in data:
        raise CheckpointError(f"{path}: not a BEATs checkpoint (no 'model' entry)")
    b = model.config.beats
    _check_dims(
        str(path),
        data.get("cfg", {}),
        {
            "embed_dim": b.embed_dim,
            "encoder_embed_dim": b.encoder_embed_dim,
            "encoder_layers": b.encoder_layers,
            "encoder_attention_heads": b.encoder_attention_heads,
            "encoder_ffn_embed_dim": b.encoder_ffn_embed_dim,
            "conv_pos": b.conv_pos,
            "conv_pos_groups": b.conv_pos_groups,
            "num_buckets": b.num_buckets,
        },
    )
    state = normalize_beats_state_dict(data["model"])
    sources = {k: tensor_source(v) for k, v in state.items()}
    return _load_part(
        model, sources, "speech_encoder.beats_model.", name_map.beats_checkpoint_name, lambda k: None, str(path)
    )


# ---------------------------------------------------------------------------------------------------- OryxViT
_VIT_WRAPPERS = ("state_dict", "model", "module")
_VIT_PREFIXES = ("model.vision_tower.vision_tower.", "vision_tower.vision_tower.", "vision_tower.", "module.")
_VIT_DROPPED = (
    (re.compile(r"^norm\.(weight|bias)$"), "final norm (OryxViT uses the last block's output without it)"),
    (re.compile(r"^fc_norm\."), "final norm (unused)"),
    (re.compile(r"^attn_pool\."), "attention-pool head (unused)"),
    (re.compile(r"^head\."), "classifier head (unused)"),
)


def load_vit(model: OlaModel, path: str | Path, resize_pos_embed: bool = True) -> LoadReport:
    """An OryxViT / SigLIP-shaped timm ``.pth`` -> the vision tower.

    A position table of another square grid (e.g. SigLIP's 24x24 or 27x27) is resized bilinearly to the model's grid
    when ``resize_pos_embed`` (recorded in the report); a patch size other than the model's is an error.
    """
    path = Path(path)
    data = _torch_load(path)
    for wrapper in _VIT_WRAPPERS:
        if isinstance(data.get(wrapper), dict) and not isinstance(data.get(wrapper), torch.Tensor):
            data = data[wrapper]
            break
    prefixes = {p for p in _VIT_PREFIXES if any(k.startswith(p) for k in data)}
    prefix = max(prefixes, key=len) if prefixes else ""
    if prefix and not all(k.startswith(prefix) for k in data):
        raise CheckpointError(f"{path}: mixes keys with and without the prefix {prefix!r}")
    state = {k.removeprefix(prefix): v for k, v in data.items()}
    notes = []
    pos = state.get("pos_embed")
    grid = model.config.vision.pos_grid
    if pos is not None and pos.shape[1] != grid * grid and resize_pos_embed:
        old = math.isqrt(pos.shape[1])
        if old * old != pos.shape[1]:
            raise CheckpointError(f"{path}: pos_embed has {pos.shape[1]} positions, not a square grid")
        table = pos.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        table = F.interpolate(table, size=(grid, grid), mode="bilinear", align_corners=False)
        state["pos_embed"] = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
        notes.append(f"pos_embed resized from {old}x{old} to {grid}x{grid}")

    def skip(key: str) -> str | None:
        for pattern, reason in _VIT_DROPPED:
            if pattern.match(key):
                return reason
        return None

    sources = {k: tensor_source(v) for k, v in state.items()}
    report = _load_part(model, sources, "vision_tower.", name_map.vit_checkpoint_name, skip, str(path))
    report.notes += notes
    return report


def load_components(
    model: OlaModel,
    llm: str | Path | None = None,
    whisper: str | Path | None = None,
    beats: str | Path | None = None,
    vit: str | Path | None = None,
) -> dict[str, LoadReport]:
    """Load any of the component checkpoints; parts not given keep their current weights."""
    reports: dict[str, LoadReport] = {}
    if llm is not None:
        reports["llm"] = load_qwen(model, llm)
    if whisper is not None:
        reports["whisper"] = load_whisper(model, whisper)
    if beats is not None:
        reports["beats"] = load_beats(model, beats)
    if vit is not None:
        reports["vision_tower"] = load_vit(model, vit)
    return reports


__all__ = ["INDEX_FILE", "SINGLE_FILE", "load_beats", "load_components", "load_qwen", "load_vit", "load_whisper"]
