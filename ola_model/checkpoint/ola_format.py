"""The Ola checkpoint layout: ``config.json`` + sharded safetensors with an index (+ tokenizer files).

This is the published ``THUdyh/Ola-7b`` layout (``OlaQwenForCausalLM`` key names) and also our own format: our
``config.json`` carries the published keys plus the full nested :class:`~ola_model.config.OlaConfig` under
``"ola_config"``, so one strict loader serves both and a saved model loads back losslessly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ola_model.beats import normalize_beats_state_dict
from ola_model.checkpoint.name_map import build_map, ola_checkpoint_name
from ola_model.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from ola_model.checkpoint.strict import LoadReport, TensorSource, check_strict, named_tensors, read_plan
from ola_model.config import OlaConfig
from ola_model.errors import CheckpointError
from ola_model.model import OlaModel, build_model

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3

_BEATS_PREFIX = "model.speech_encoder.beats_model."
_REL_BIAS = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$")

# Published config.json keys -> LLMConfig fields.
_LLM_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ----------------------------------------------------------------------------------------------------------- config
def published_config(config: OlaConfig, dtype: torch.dtype) -> dict:
    """``config.json`` in the published ``ola_qwen`` layout, plus our nested config under ``ola_config``."""
    llm = config.llm
    data = {k: getattr(llm, k) for k in _LLM_KEYS}
    data.update(
        architectures=["OlaQwenForCausalLM"],
        model_type="ola_qwen",
        hidden_act="silu",
        rope_scaling=None,
        sliding_window=None,
        use_sliding_window=False,
        max_window_layers=llm.num_hidden_layers,
        attention_dropout=0.0,
        initializer_range=llm.initializer_range,
        mm_hidden_size=config.vision.hidden_size,
        mm_projector_type=config.projector.vision_type,
        mm_vision_select_layer=-1,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        speech_encoder_type="dual",
        speech_encoder_hidden_size=config.speech_encoder_hidden_size,
        speech_encoder_ds_rate=config.projector.speech_ds_rate,
        speech_projector_type=config.projector.speech_type,
        tokenizer_model_max_length=config.limits.max_context,
        tokenizer_padding_side="right",
        torch_dtype=_DTYPE_NAMES.get(dtype, "float32"),
        use_cache=True,
        ola_config=config.to_dict(),
    )
    return data


def config_from_json(data: dict, tokenizer_vocab_size: int | None = None) -> OlaConfig:
    """An :class:`OlaConfig` from a checkpoint's ``config.json``: ours (nested) or the published one (flat)."""
    if "ola_config" in data:
        return OlaConfig.from_dict(data["ola_config"])
    if data.get("model_type") != "ola_qwen":
        raise CheckpointError(f"config.json has model_type {data.get('model_type')!r}; expected 'ola_qwen'")
    # The published config only describes the LLM; encoders and projectors are Ola-7b's (checked below).
    config = OlaConfig.from_name("ola-7b")
    for key in _LLM_KEYS:
        if key in data and data[key] is not None:
            setattr(config.llm, key, type(getattr(config.llm, key))(data[key]))
    checks = {
        "mm_hidden_size": config.vision.hidden_size,
        "speech_encoder_hidden_size": config.speech_encoder_hidden_size,
        "speech_encoder_ds_rate": config.projector.speech_ds_rate,
    }
    for key, want in checks.items():
        if key in data and data[key] != want:
            raise CheckpointError(f"config.json {key}={data[key]} but the Ola architecture needs {want}")
    if data.get("rope_scaling"):
        log.warning("config.json sets rope_scaling=%s; Ola forces it to None", data["rope_scaling"])
    if data.get("tokenizer_model_max_length"):
        config.limits.max_context = int(data["tokenizer_model_max_length"])
    config.name = "ola-7b" if config.llm == OlaConfig.from_name("ola-7b").llm else "ola-custom"
    config.tokenizer_vocab_size = tokenizer_vocab_size or min(config.tokenizer_vocab_size, config.llm.vocab_size)
    config.__post_init__()
    return config


def read_config(path: str | Path) -> OlaConfig:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not an Ola checkpoint directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: invalid JSON: {exc}") from exc
    tokenizer_size = None
    if "ola_config" not in data:
        tokenizer_size = _tokenizer_size(path)
    return config_from_json(data, tokenizer_size)


def _tokenizer_size(path: Path) -> int | None:
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        return None
    from ola_model.tokenizer import load_tokenizer

    return len(load_tokenizer(path))


# ---------------------------------------------------------------------------------------------------------- tensors
def checkpoint_sources(path: str | Path) -> dict[str, TensorSource]:
    """Every tensor of a checkpoint directory (index + shards, or one ``model.safetensors``), headers only."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{path / INDEX_FILE}: invalid index: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}")
    sources: dict[str, TensorSource] = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: shard {name} named by the index is missing")
        shard = SafetensorsFile(path / name)
        for key, entry in shard.entries.items():
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{path}: {key!r} is in {name} but the index says {weight_map.get(key)!r}")
            if key in sources:
                raise CheckpointError(f"{path}: {key!r} is stored twice")
            sources[key] = TensorSource(entry.shape, entry.dtype, lambda out, f=shard, k=key: f.read_into(k, out))
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(sources))
        if absent:
            raise CheckpointError(f"{path}: keys in the index but in no shard", missing=absent)
    return sources


def expected_checkpoint_shapes(config: OlaConfig) -> dict[str, tuple[int, ...]]:
    """The published checkpoint's keys and shapes for ``config``, derived from the model through the name map."""
    model = build_model(config, device="meta")
    return {ola_checkpoint_name(name): tuple(t.shape) for name, t in named_tensors(model).items()}


def _beats_duplicates(sources: dict[str, TensorSource]) -> set[str]:
    """Keys of per-layer copies of BEATs' shared relative-attention bias, verified equal to layer 0's."""
    found = {
        k: s for k, s in sources.items() if k.startswith(_BEATS_PREFIX) and _REL_BIAS.match(k[len(_BEATS_PREFIX) :])
    }
    if len(found) <= 1:
        return set()
    tensors = {}
    for key, src in found.items():
        t = torch.empty(src.shape, dtype=src.dtype)
        src.read_into(t)
        tensors[key] = t
    kept = normalize_beats_state_dict(tensors, prefix=_BEATS_PREFIX)
    return set(found) - set(kept)


# --------------------------------------------------------------------------------------------------------- loading
def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> OlaModel:
    """Load an Ola checkpoint directory strictly.

    Args:
        path: a directory in the published Ola-7b layout or our own (same layout, nested config).
        device: where the model lives.
        dtype: parameter dtype (BEATs stays float32); None = the checkpoint's ``torch_dtype``.
        progress: show a progress bar over bytes read.
    Returns:
        the model in eval mode, with ``model.load_report`` (a :class:`LoadReport`).
    Raises:
        CheckpointError: unreadable files, or missing / unexpected / mis-shaped keys (each named); no weights are
            read before every key has been checked. Weights are read straight into the model's storage, so memory
            peaks at about one copy of the weights.
    """
    model, sources, plan, skipped = _plan_load(Path(path), dtype)
    model.to_empty(device=device)
    total = sum(sources[key].dtype.itemsize * _numel(sources[key].shape) for key, _ in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        report: LoadReport = read_plan(model, sources, plan, skipped, what=str(path), progress=bar.update)
    report.notes.append(f"dtype {model.dtype}; BEATs float32")
    model.reset_nonpersistent_buffers()
    model.load_report = report
    log.info("loaded %d tensors (%.1f MB) from %s", report.loaded, report.bytes / 1e6, path)
    return model.eval()


def _plan_load(path: Path, dtype: torch.dtype | None):
    """Config, sources and the strict key plan of a checkpoint, on a meta-device model (no weights read)."""
    config = read_config(path)
    if dtype is None:
        stored = json.loads((path / CONFIG_FILE).read_text()).get("torch_dtype", "float32")
        dtype = {v: k for k, v in _DTYPE_NAMES.items()}.get(stored, torch.float32)
    sources = checkpoint_sources(path)
    duplicates = _beats_duplicates(sources)
    model = build_model(config, device="meta", dtype=dtype)
    names = list(named_tensors(model))
    key_to_param = build_map(names, ola_checkpoint_name)

    def skip(key: str) -> str | None:
        return "copy of the shared BEATs relative-attention bias (layer 0)" if key in duplicates else None

    shapes = {name: tuple(t.shape) for name, t in named_tensors(model).items()}
    plan, skipped = check_strict(shapes, sources, key_to_param, names, skip=skip, what=str(path))
    return model, sources, plan, skipped


def verify_checkpoint(path: str | Path) -> LoadReport:
    """Check a checkpoint directory against its config without reading the weights (only headers).

    Returns:
        a report whose ``loaded`` / ``bytes`` say what a load would read, and the keys it would skip.
    Raises:
        CheckpointError: as :func:`load_checkpoint` would, naming every missing, unexpected and mis-shaped key.
    """
    model, sources, plan, skipped = _plan_load(Path(path), None)
    report = LoadReport(skipped=skipped)
    report.loaded = len(plan)
    report.bytes = sum(sources[key].dtype.itemsize * _numel(sources[key].shape) for key, _ in plan)
    report.notes.append(f"config {model.config.name!r}")
    return report


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------------------- saving
def save_checkpoint(
    model: OlaModel,
    path: str | Path,
    tokenizer=None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` (and its tokenizer) in the Ola checkpoint layout, atomically.

    Everything is written to a temporary directory beside ``path`` and renamed into place at the end, so a
    directory at ``path`` is always complete. Each tensor keeps its dtype (BEATs float32), so loading is lossless.

    Returns:
        the checkpoint directory.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        tensors = {ola_checkpoint_name(k): v for k, v in named_tensors(model).items()}
        shards: list[list[str]] = [[]]
        size = 0
        for key in sorted(tensors):
            nbytes = tensors[key].numel() * tensors[key].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        weight_map, total = {}, 0
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(tmp / name, {k: tensors[k] for k in keys}, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = published_config(model.config, model.dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = generation_config(model.config)
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint to %s (%d shards)", path, len(shards))
    return path


def generation_config(config: OlaConfig) -> dict:
    """``generation_config.json``: Ola's sampling defaults (``infer.py``)."""
    llm = config.llm
    return {
        "do_sample": True,
        "temperature": 0.2,
        "top_k": 20,
        "top_p": None,
        "repetition_penalty": 1.05,
        "max_new_tokens": 1024,
        "bos_token_id": llm.bos_token_id,
        "eos_token_id": [llm.eos_token_id, llm.pad_token_id],
        "pad_token_id": llm.pad_token_id,
    }
