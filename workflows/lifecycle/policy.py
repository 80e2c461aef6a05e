"""The promotion policy: which evaluation metrics a candidate must hold against the champion, and the canary plan.

One YAML file (``workflows/configs/lifecycle/promotion.yaml``) holds both halves:

- ``gate.metrics``: per metric, whether higher or lower is better, the ``tolerance`` (how much worse than the champion
  a candidate may be, in the metric's own units), optional absolute ``floor`` / ``ceiling`` and whether the metric is
  ``required`` (a missing required metric fails the gate; a missing optional one is skipped);
- ``canary``: the traffic ``steps`` (percent of new sessions on the challenger), the analysis ``window_s`` of each step,
  ``min_requests`` the challenger must serve in a window before it is judged, the ``thresholds`` that roll it back,
  and the quality ``probes`` (fixed prompts with known answers, a YAML list referenced by path).

Everything is validated when loaded; a bad file raises :class:`PolicyError` naming the file and every offending key
(``canary.steps: ...``). :func:`load_policy` with no argument loads the shipped policy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workflows.config_errors import format_errors

log = logging.getLogger(__name__)

FIELDS_IN = "workflows/lifecycle/policy.py"  # where a policy's fields are documented

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "lifecycle"
DEFAULT_POLICY = CONFIG_DIR / "promotion.yaml"


class PolicyError(ValueError):
    """A promotion policy or probe file that does not validate; the message names the source and every bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------------ the gate
class MetricRule(_Strict):
    """How one evaluation metric is judged."""

    direction: Literal["higher", "lower"] = Field(
        ..., description="Which way is better (accuracy: higher, WER: lower)."
    )
    tolerance: float = Field(0.0, ge=0, description="How much worse than the champion is allowed (absolute units).")
    floor: float | None = Field(None, description="The candidate's value must be at least this (any champion).")
    ceiling: float | None = Field(None, description="The candidate's value must be at most this (any champion).")
    required: bool = Field(True, description="A missing required metric fails the gate; a missing optional is skipped.")

    @field_validator("tolerance", "floor", "ceiling")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> MetricRule:
        if self.floor is not None and self.ceiling is not None and self.floor > self.ceiling:
            raise ValueError(f"floor ({self.floor}) is over ceiling ({self.ceiling})")
        return self

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` in this metric's direction."""
        return a > b if self.direction == "higher" else a < b


class GatePolicy(_Strict):
    """The offline gate: evaluation metrics of a candidate against the champion's."""

    metrics: dict[str, MetricRule] = Field(..., description="Metric name -> rule (at least one).")

    @field_validator("metrics")
    @classmethod
    def _some(cls, value: dict[str, MetricRule]) -> dict[str, MetricRule]:
        if not value:
            raise ValueError("at least one metric is needed")
        for name in value:
            if not name or name != name.strip():
                raise ValueError(f"metric names must be non-empty without surrounding spaces, got {name!r}")
        return value


# ------------------------------------------------------------------------------------------------ probes
class Probe(_Strict):
    """A fixed prompt with known answers, asked of a version during its canary."""

    id: str = Field(..., min_length=1)
    prompt: str = Field(..., min_length=1, description="The user text sent as one Chat turn.")
    answers: list[str] = Field(..., min_length=1, description="Accepted answers (case and surrounding space ignored).")
    match: Literal["exact", "contains"] = Field(
        "contains", description="exact: the whole reply; contains: a substring."
    )
    max_new_tokens: int = Field(32, ge=1, le=4096)

    def accepts(self, reply: str) -> bool:
        """Whether ``reply`` is one of the accepted answers."""
        got = " ".join(reply.split()).casefold()
        for answer in self.answers:
            want = " ".join(answer.split()).casefold()
            if (got == want) if self.match == "exact" else (want in got):
                return True
        return False


class ProbeSet(_Strict):
    probes: list[Probe] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ProbeSet:
        seen: set[str] = set()
        for probe in self.probes:
            if probe.id in seen:
                raise ValueError(f"probe id {probe.id!r} appears twice")
            seen.add(probe.id)
        return self


def probe_accuracy(probes: list[Probe], ask: Callable[[Probe], str]) -> float:
    """The fraction of ``probes`` whose reply (``ask(probe)``) is accepted; a probe whose call raises counts wrong."""
    if not probes:
        raise ValueError("probe_accuracy: no probes")
    right = 0
    for probe in probes:
        try:
            right += probe.accepts(ask(probe))
        except Exception as exc:  # a failing version fails its probes; the caller sees the accuracy
            log.warning("probe %s failed: %s", probe.id, exc)
    return right / len(probes)


# ------------------------------------------------------------------------------------------------ the canary
class CanaryThresholds(_Strict):
    """Breaches that roll a challenger back (each compared with the champion over the same window)."""

    max_error_rate_increase: float = Field(
        0.02, ge=0, le=1, description="Challenger error rate minus champion error rate allowed (0.02: 2 points)."
    )
    max_p95_latency_ratio: float = Field(1.5, gt=0, description="Challenger p95 request latency / champion's.")
    max_ttft_ratio: float = Field(1.5, gt=0, description="Challenger p95 time to first token / champion's.")
    min_probe_accuracy: float = Field(0.8, ge=0, le=1, description="Fraction of quality probes answered right.")


class CanaryPlan(_Strict):
    """Traffic steps and how each step is judged."""

    steps: list[float] = Field([5.0, 25.0, 50.0, 100.0], description="Challenger share of new sessions, percent.")
    window_s: float = Field(300.0, gt=0, description="Analysis window of each step, seconds.")
    min_requests: int = Field(50, ge=1, description="Challenger requests a window needs before it is judged.")
    thresholds: CanaryThresholds = Field(default_factory=CanaryThresholds)
    probes: str | None = Field(None, description="Path of the probe YAML (relative to the policy file).")

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("at least one step is needed")
        for i, share in enumerate(value):
            if not (math.isfinite(share) and 0 < share <= 100):
                raise ValueError(f"step {i} is {share}; every step must be in (0, 100]")
            if i and share <= value[i - 1]:
                raise ValueError(f"steps must increase strictly; step {i} ({share}) <= step {i - 1} ({value[i - 1]})")
        if value[-1] != 100:
            raise ValueError(f"the last step must be 100 (all new sessions), got {value[-1]}")
        return value


class PromotionPolicy(_Strict):
    """The whole policy: the offline gate and the online canary plan (with its probes loaded)."""

    gate: GatePolicy
    canary: CanaryPlan = Field(default_factory=CanaryPlan)
    probe_set: list[Probe] = Field(default_factory=list, description="The probes of canary.probes, loaded.")

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | None, source: str = "policy", base_dir: Path | None = None
    ) -> PromotionPolicy:
        """Validate plain data; ``canary.probes`` is read relative to ``base_dir`` (default: the working directory)."""
        if data is not None and not isinstance(data, Mapping):
            raise PolicyError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
        data = dict(data or {})
        if "probe_set" in data:
            raise PolicyError(f"{source}: probe_set: unknown key (list probes in the file named by canary.probes)")
        try:
            policy = cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(format_errors(exc, source, "promotion policy", FIELDS_IN)) from None
        if policy.canary.probes:
            path = Path(policy.canary.probes)
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            policy = policy.model_copy(update={"probe_set": load_probes(path)})
        return policy

    @classmethod
    def from_yaml(cls, path: str | Path) -> PromotionPolicy:
        path = Path(path)
        return cls.from_mapping(_read_yaml(path), str(path), path.parent)


def load_policy(path: str | Path | None = None) -> PromotionPolicy:
    """The policy at ``path``; None: the shipped ``workflows/configs/lifecycle/promotion.yaml``."""
    return PromotionPolicy.from_yaml(path or DEFAULT_POLICY)


def load_probes(path: str | Path) -> list[Probe]:
    """The probes of a YAML file ``{probes: [{id, prompt, answers, match?, max_new_tokens?}, ...]}``."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, Mapping):
        raise PolicyError(f"{path}: the top level must be a mapping with a `probes` list")
    try:
        return list(ProbeSet.model_validate(dict(data)).probes)
    except ValidationError as exc:
        raise PolicyError(format_errors(exc, str(path), "promotion policy", FIELDS_IN)) from None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the file: {exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
