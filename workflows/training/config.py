"""The training recipe's schema: a YAML file of model init, data, defaults and the ordered stages of Ola's progressive
modality alignment (``ola-architecture.md`` §6).

A stage names the model parts it trains (the names of :meth:`ola_model.model.OlaModel.part_modules`), its data mix
(task -> weight), its length (steps or epochs) and its optimisation settings. ``defaults`` fill every key a stage
leaves out. Every key is checked: an unknown key, part or value is a :class:`ConfigError` naming where it is
(``stages[2].trainable``) and what is allowed. Relative paths are taken relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ola_model.config import PRESETS, OlaConfig
from ola_model.model import PARTS

Precision = Literal["auto", "bf16", "fp32"]
Schedule = Literal["cosine", "constant"]
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "constant")
ZERO_STAGES = (0, 1, 2, 3)
_TASK = re.compile(r"^[A-Za-z0-9_.-]+$")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:.+")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")


class ConfigError(ValueError):
    """A training config is invalid; the message names the key and the rule."""


# ------------------------------------------------------------------------------------------------------ the schema
@dataclass
class InitSpec:
    """Component checkpoints a fresh model loads (``ola_model.checkpoint.components.load_components``)."""

    llm: str | None = None  # an HF Qwen2.5 directory
    whisper: str | None = None  # an openai-whisper .pt or an HF Whisper directory
    beats: str | None = None  # a BEATs .pt
    vit: str | None = None  # an OryxViT / SigLIP-shaped .pth
    # a dataset directory: the ViT's patch embedding becomes the whitened PCA of its train images' patches
    # (workflows/training/patch_init.py; for a ViT trained from scratch, so not together with vit)
    vit_patches: str | None = None
    # a dataset directory: Whisper's conv1 becomes the whitened PCA of its train audio's log-mel windows, conv2 a
    # He-normal start (workflows/training/patch_init.py; for a Whisper trained from scratch, so not with whisper)
    whisper_mels: str | None = None

    def __post_init__(self) -> None:
        if self.vit is not None and self.vit_patches is not None:
            raise ConfigError("model.init: vit and vit_patches both set; vit_patches starts a ViT without weights")
        if self.whisper is not None and self.whisper_mels is not None:
            raise ConfigError(
                "model.init: whisper and whisper_mels both set; whisper_mels starts a Whisper without weights"
            )


@dataclass
class ModelSpec:
    """The model the first stage starts from."""

    preset: str = "tiny"
    seed: int = 0  # seeds the random initialisation of every part no init checkpoint covers
    init: InitSpec = field(default_factory=InitSpec)
    # dimensions replaced in the preset, e.g. {llm: {hidden_size: 128, num_hidden_layers: 4}} (the demo model)
    overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None  # None: the shipped tiny tokenizer (tiny) or the init.llm directory

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        if self.preset != "tiny" and self.tokenizer is None and self.init.llm is None:
            raise ConfigError(
                f"model: preset {self.preset!r} needs model.tokenizer or model.init.llm (a tokenizer dir)"
            )
        self.model_config()

    def model_config(self) -> OlaConfig:
        """The preset with ``overrides`` applied. Raises ConfigError naming a bad override key."""
        try:
            return OlaConfig.from_name(self.preset).with_overrides(self.overrides)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model.overrides: {exc}") from exc


@dataclass
class DataSpec:
    """Where the datasets (``docs/data-format.md`` layout) live, and the label convention."""

    root: str = ".cache/data/tiny"
    split: str = "train"
    # False: <|im_start|>, <|im_end|> and "\n" markers are supervised in assistant turns only (our default);
    # True: in every turn, as Ola's training code does (ola-architecture.md §4.4).
    label_all_turn_markers: bool = False


@dataclass
class ResourcesSpec:
    """How many workers train a stage and on what."""

    workers: int = 1  # data-parallel workers (processes); 1 = in-process unless ``ray`` is true
    use_gpu: bool | None = None  # None: use CUDA when available
    ray: bool = False  # run on Ray Train even with one worker
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"resources.workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"resources.cpus_per_worker must be positive, got {self.cpus_per_worker}")


@dataclass
class TrackingSpec:
    """MLflow tracking of the pipeline run (``workflows.tracking``)."""

    enabled: bool = True  # false: no MLflow at all (no runs, no registration)
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the embedded store sqlite:///.cache/mlflow/mlflow.db
    experiment: str | None = None  # None: the config's name

    def __post_init__(self) -> None:
        if self.uri is not None and not _URI_SCHEME.match(self.uri):
            raise ConfigError(
                f"tracking.uri: expected a URI with a scheme (http://host:5000, sqlite:///x.db), got {self.uri!r}"
            )
        if self.experiment is not None and not (0 < len(self.experiment.strip()) <= 256):
            raise ConfigError(
                f"tracking.experiment: expected a non-empty name of at most 256 characters, got {self.experiment!r}"
            )


@dataclass
class ArtifactsSpec:
    """Where finished stage checkpoints are uploaded (``workflows.artifacts``), besides the output directory."""

    uri: str | None = None  # None: only the output directory; s3://bucket/prefix (MinIO, S3) or a directory
    endpoint_url: str | None = None  # S3 endpoint; None: $OLA_S3_ENDPOINT_URL, else $MLFLOW_S3_ENDPOINT_URL, else AWS

    def __post_init__(self) -> None:
        if self.uri is not None:
            if not self.uri.strip():
                raise ConfigError("artifacts.uri: empty; give s3://bucket/prefix or a directory, or leave it out")
            if self.uri.startswith("s3:") and not re.match(r"^s3://[^/]+", self.uri):
                raise ConfigError(f"artifacts.uri: expected s3://bucket/prefix, got {self.uri!r}")
            scheme = self.uri.split("://", 1)[0] if "://" in self.uri else ""
            if scheme not in ("", "s3", "file"):
                raise ConfigError(f"artifacts.uri: scheme {scheme!r} is not supported; use s3://, file:// or a path")
        if self.endpoint_url is not None and not re.match(r"^https?://[^/]+", self.endpoint_url):
            raise ConfigError(f"artifacts.endpoint_url: expected http(s)://host[:port], got {self.endpoint_url!r}")


@dataclass
class RegistrySpec:
    """Registration of finished stage outputs in the MLflow model registry (``workflows.lifecycle.registry``)."""

    model_name: str = "ola"
    register: bool = True  # needs tracking

    def __post_init__(self) -> None:
        if not _MODEL_NAME.match(self.model_name):
            raise ConfigError(f"registry.model_name: {self.model_name!r} must match {_MODEL_NAME.pattern}")


@dataclass
class StageConfig:
    """One stage of progressive modality alignment."""

    name: str
    trainable: tuple[str, ...]
    data: dict[str, float]  # task -> weight: a weight w uses round(w * n_task) samples per epoch (w > 1 repeats)
    description: str = ""
    data_root: str | None = None  # None: data.root
    steps: int | None = None  # optimizer steps; exactly one of steps / epochs
    epochs: float | None = None
    lr: float = 1e-5
    # part -> learning rate of its own (Ola's mm_vision_tower_lr / mm_projector_lr / speech_projector_lr family);
    # the parts left out take lr. The schedule scales every rate alike.
    part_lr: dict[str, float] = field(default_factory=dict)
    warmup_ratio: float = 0.05  # warmup steps = ceil(ratio * total steps), linear from 0
    schedule: Schedule = "cosine"  # cosine decay to min_lr_ratio * lr after warmup, or constant
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # applied to >= 2-D weights only
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 2  # samples per worker per micro-batch
    grad_accum: int = 1
    max_length: int = 16384  # LLM positions per sample after media expansion; longer samples are dropped
    zero_stage: int = 2
    precision: Precision = "auto"  # auto: bf16 on CUDA with bf16 support, else fp32
    grad_clip: float = 1.0  # 0 = off
    save_every: int = 1000  # optimizer steps between resumable checkpoints
    keep_last: int = 2  # resumable checkpoints kept while the stage runs (all are removed once it is done)
    seed: int = 0
    group_by_length: bool = True
    max_video_frames: int = 64
    gradient_checkpointing: bool = False  # the LLM's (active while the LLM trains)
    dataloader_workers: int = 0
    zero3_param_persistence_threshold: int = 100_000  # ZeRO-3: parameters this small are not partitioned

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not _STAGE_NAME.match(self.name):
            raise ConfigError(f"{where}: name must match {_STAGE_NAME.pattern} (it names a directory)")
        if not self.trainable:
            raise ConfigError(f"{where}: trainable is empty; name at least one of {list(PARTS)}")
        unknown = [p for p in self.trainable if p not in PARTS]
        if unknown:
            raise ConfigError(f"{where}: unknown part(s) {unknown} in trainable; known parts: {list(PARTS)}")
        if len(set(self.trainable)) != len(self.trainable):
            raise ConfigError(f"{where}: trainable lists a part twice: {list(self.trainable)}")
        if not self.data:
            raise ConfigError(f"{where}: data is empty; give task -> weight (or a list of tasks)")
        for task, weight in self.data.items():
            if not _TASK.match(task):
                raise ConfigError(f"{where}: data task name {task!r} must match {_TASK.pattern}")
            if not (isinstance(weight, (int, float)) and weight > 0 and math.isfinite(weight)):
                raise ConfigError(f"{where}: data weight of {task!r} must be a positive number, got {weight!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(
                f"{where}: give exactly one of steps and epochs (got steps={self.steps}, epochs={self.epochs})"
            )
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"{where}: steps must be at least 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{where}: epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"{where}: lr must be positive, got {self.lr}")
        if not isinstance(self.part_lr, dict):
            raise ConfigError(f"{where}: part_lr must map part names to learning rates, got {self.part_lr!r}")
        for part, rate in self.part_lr.items():
            if part not in self.trainable:
                trains = list(self.trainable)
                raise ConfigError(
                    f"{where}: part_lr names {part!r}, which this stage does not train; trainable: {trains}"
                )
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate > 0 and math.isfinite(rate)):
                raise ConfigError(f"{where}: part_lr of {part!r} must be a positive number, got {rate!r}")
        _check_range(where, "warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _check_range(where, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range(where, "weight_decay", self.weight_decay, 0.0, 1.0)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}: schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{where}: precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"{where}: zero_stage must be one of {list(ZERO_STAGES)}, got {self.zero_stage!r}")
        for key in ("batch_size", "grad_accum", "save_every", "keep_last", "max_video_frames"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: {key} must be at least 1, got {getattr(self, key)}")
        if self.max_length < 16:
            raise ConfigError(f"{where}: max_length must be at least 16, got {self.max_length}")
        if self.grad_clip < 0 or self.dataloader_workers < 0 or self.zero3_param_persistence_threshold < 0:
            raise ConfigError(f"{where}: grad_clip, dataloader_workers, zero3_param_persistence_threshold must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"{where}: adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.precision == "bf16" and "beats" in self.trainable:
            raise ConfigError(f"{where}: BEATs runs in float32; training it needs precision fp32, not bf16")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["trainable"] = list(self.trainable)
        data["adam_betas"] = list(self.adam_betas)
        if not self.part_lr:  # left out when unset, so runs interrupted before the key existed still resume
            del data["part_lr"]
        return data


@dataclass
class TrainConfig:
    """A whole recipe: the model to start from, the data, and the stages in order."""

    name: str
    model: ModelSpec
    data: DataSpec
    stages: list[StageConfig]
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    source: str | None = None  # the YAML file it was read from
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    artifacts: ArtifactsSpec = field(default_factory=ArtifactsSpec)
    registry: RegistrySpec = field(default_factory=RegistrySpec)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages: the config has no stages")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"stages: stage names must be unique; repeated: {dupes}")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage {name!r} in config {self.name!r}; stages: {[s.name for s in self.stages]}")

    def data_root(self, stage: StageConfig) -> Path:
        return Path(stage.data_root if stage.data_root is not None else self.data.root)


def _check_range(where: str, key: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{where}: {key} must be in [{low}, {high}{bracket}, got {value}")


# ------------------------------------------------------------------------------------------------------- loading
_TOP_KEYS = {"name", "model", "data", "defaults", "stages", "resources", "tracking", "artifacts", "registry"}
_STAGE_KEYS = {f.name for f in dataclasses.fields(StageConfig)}
_DEFAULTABLE = _STAGE_KEYS - {"name", "description", "trainable", "data"}


def _fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _expect_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Check / convert a YAML scalar against a field's (string) annotation."""
    optional = annotation.endswith("| None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    base = annotation.removesuffix(" | None")
    if base == "bool" or base.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if base == "str" or base in ("Precision", "Schedule"):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and base == "str":
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if base.startswith("tuple[float"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{where}: expected a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    return value


def _build(cls: type, raw: dict[str, Any], where: str, /, **extra: Any) -> Any:
    fields = _fields_of(cls)
    _check_keys(raw, set(fields) - set(extra), where)
    kwargs = {k: _coerce(v, str(fields[k].type), f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs, **extra)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{where}: {exc}") from exc


def _data_mix(value: Any, where: str) -> dict[str, float]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        if not all(isinstance(t, str) for t in value):
            raise ConfigError(f"{where}: a list of task names must hold strings, got {value!r}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: a task is listed twice: {value!r}")
        return dict.fromkeys(value, 1.0)
    if isinstance(value, dict):
        mix = {}
        for task, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"{where}.{task}: weight must be a number, got {weight!r}")
            mix[str(task)] = float(weight)
        return mix
    raise ConfigError(f"{where}: expected task -> weight or a list of tasks, got {type(value).__name__}")


def _stage(raw: Any, defaults: dict[str, Any], index: int) -> StageConfig:
    where = f"stages[{index}]"
    raw = _expect_mapping(raw, where)
    _check_keys(raw, _STAGE_KEYS, where)
    if "name" not in raw:
        raise ConfigError(f"{where}: missing key 'name'")
    where = f"stages[{index}] ({raw['name']})"
    merged = {**defaults, **raw}
    # A stage that sets steps replaces default epochs, and the reverse.
    if "steps" in raw and "epochs" not in raw:
        merged.pop("epochs", None)
    if "epochs" in raw and "steps" not in raw:
        merged.pop("steps", None)
    for key in ("trainable", "data"):
        if key not in merged:
            raise ConfigError(f"{where}: missing key {key!r}")
    trainable = merged.pop("trainable")
    if isinstance(trainable, str):
        trainable = [trainable]
    if not isinstance(trainable, list) or not all(isinstance(p, str) for p in trainable):
        raise ConfigError(f"{where}.trainable: expected a list of part names, got {trainable!r}")
    data = _data_mix(merged.pop("data"), f"{where}.data")
    merged["name"] = str(merged["name"])
    return _build(StageConfig, merged, where, trainable=tuple(trainable), data=data)


def config_from_dict(raw: Any, source: str | None = None) -> TrainConfig:
    """Validate a parsed YAML document into a :class:`TrainConfig`."""
    raw = _expect_mapping(raw, "config")
    _check_keys(raw, _TOP_KEYS, "config")
    for key in ("name", "model", "stages"):
        if key not in raw:
            raise ConfigError(f"config: missing key {key!r}")
    model_raw = _expect_mapping(raw["model"], "model")
    init = _build(InitSpec, _expect_mapping(model_raw.get("init"), "model.init"), "model.init")
    overrides = _expect_mapping(model_raw.get("overrides"), "model.overrides")
    model = _build(
        ModelSpec,
        {k: v for k, v in model_raw.items() if k not in ("init", "overrides")},
        "model",
        init=init,
        overrides=overrides,
    )
    data = _build(DataSpec, _expect_mapping(raw.get("data"), "data"), "data")
    resources = _build(ResourcesSpec, _expect_mapping(raw.get("resources"), "resources"), "resources")
    defaults = _expect_mapping(raw.get("defaults"), "defaults")
    _check_keys(defaults, _DEFAULTABLE, "defaults")
    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list):
        raise ConfigError(f"stages: expected a list of stages, got {type(stages_raw).__name__}")
    stages = [_stage(s, defaults, i) for i, s in enumerate(stages_raw)]
    tracking = _build(TrackingSpec, _expect_mapping(raw.get("tracking"), "tracking"), "tracking")
    artifacts = _build(ArtifactsSpec, _expect_mapping(raw.get("artifacts"), "artifacts"), "artifacts")
    registry = _build(RegistrySpec, _expect_mapping(raw.get("registry"), "registry"), "registry")
    return TrainConfig(
        name=str(raw["name"]),
        model=model,
        data=data,
        stages=stages,
        resources=resources,
        source=source,
        tracking=tracking,
        artifacts=artifacts,
        registry=registry,
    )


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training YAML file.

    Raises:
        ConfigError: the file is missing or not YAML, or any key is unknown or invalid (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"training config {path} is not valid YAML: {exc}") from exc
    try:
        return config_from_dict(raw, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def shipped_configs() -> list[Path]:
    """The YAML files in ``workflows/configs``."""
    return sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
