"""The promotion gate: a pure decision on a candidate's evaluation metrics against the champion's.

:func:`decide` reads nothing and writes nothing: it takes the candidate's metrics, the champion's (None: there is no
champion yet, and only the absolute floors and ceilings apply) and the :class:`~workflows.lifecycle.policy.GatePolicy`,
and returns a :class:`GateDecision` with one :class:`MetricVerdict` per metric of the policy. What happens with the
decision (setting the registry's ``challenger`` alias) is the caller's business.

Rules, per metric of the policy:

- the candidate's value is missing: a required metric fails, an optional one is skipped;
- the value is not a finite number (NaN, inf): the metric fails, required or not (a broken evaluation is not a pass);
- the value is below ``floor`` or above ``ceiling``: fails;
- with a finite champion value: higher-is-better fails when ``candidate < champion - tolerance``, lower-is-better when
  ``candidate > champion + tolerance`` (exactly at the tolerance passes); a champion without the metric (or with a
  non-finite value) leaves the floors and ceilings only, and the verdict says so.

Candidate metrics the policy does not name are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from workflows.lifecycle.policy import GatePolicy, MetricRule, PromotionPolicy

# Float slack at the tolerance edge: 0.80 - 0.02 is 0.7799999999999999 in binary; a candidate of 0.78 must pass.
_EDGE_EPS = 1e-9

Outcome = Literal["pass", "fail", "skipped"]


@dataclass(frozen=True)
class MetricVerdict:
    """The verdict on one metric."""

    name: str
    outcome: Outcome
    candidate: float | None
    champion: float | None
    reason: str

    @property
    def passed(self) -> bool:
        return self.outcome != "fail"


@dataclass(frozen=True)
class GateDecision:
    """``passed`` iff no metric failed; ``reasons`` lists each failure in policy order."""

    passed: bool
    reasons: list[str]
    per_metric: dict[str, MetricVerdict] = field(default_factory=dict)

    def summary(self) -> str:
        if self.passed:
            return "gate passed: " + ", ".join(f"{v.name} {v.outcome}" for v in self.per_metric.values())
        return "gate failed: " + "; ".join(self.reasons)


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    policy: GatePolicy | PromotionPolicy,
) -> GateDecision:
    """Judge ``candidate`` against ``champion`` (None: floors and ceilings only) under ``policy``.

    Args:
        candidate: metric name -> value of the candidate version's evaluation.
        champion: the same for the current champion, or None when there is none.
        policy: the gate policy (or a whole promotion policy, whose ``gate`` is used).
    """
    gate = policy.gate if isinstance(policy, PromotionPolicy) else policy
    verdicts: dict[str, MetricVerdict] = {}
    for name, rule in gate.metrics.items():
        verdicts[name] = _judge(name, rule, candidate.get(name), None if champion is None else champion.get(name))
    reasons = [f"{v.name}: {v.reason}" for v in verdicts.values() if v.outcome == "fail"]
    return GateDecision(passed=not reasons, reasons=reasons, per_metric=verdicts)


def _number(value: object) -> float | None:
    """``value`` as a float, or None when it is not a real number (bool is not a metric value)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _judge(name: str, rule: MetricRule, cand_raw: object, champ_raw: object) -> MetricVerdict:
    champ = _number(champ_raw)
    if cand_raw is None:
        if rule.required:
            return MetricVerdict(name, "fail", None, champ, "required metric is missing from the candidate")
        return MetricVerdict(name, "skipped", None, champ, "optional metric not reported")
    cand = _number(cand_raw)
    if cand is None or not math.isfinite(cand):
        return MetricVerdict(name, "fail", cand, champ, f"candidate value {cand_raw!r} is not a finite number")
    if rule.floor is not None and cand < rule.floor - _EDGE_EPS:
        return MetricVerdict(name, "fail", cand, champ, f"{cand:g} is below the floor {rule.floor:g}")
    if rule.ceiling is not None and cand > rule.ceiling + _EDGE_EPS:
        return MetricVerdict(name, "fail", cand, champ, f"{cand:g} is above the ceiling {rule.ceiling:g}")
    if champ is None or not math.isfinite(champ):
        why = "no champion" if champ_raw is None else f"champion value {champ_raw!r} unusable"
        return MetricVerdict(name, "pass", cand, champ, f"{cand:g} within absolute bounds ({why})")
    if rule.direction == "higher":
        limit = champ - rule.tolerance
        worse = cand < limit - _EDGE_EPS
        relation = "below"
    else:
        limit = champ + rule.tolerance
        worse = cand > limit + _EDGE_EPS
        relation = "above"
    if worse:
        return MetricVerdict(
            name,
            "fail",
            cand,
            champ,
            f"{cand:g} is {relation} champion {champ:g} by more than the tolerance {rule.tolerance:g} "
            f"({rule.direction} is better; limit {limit:g})",
        )
    return MetricVerdict(name, "pass", cand, champ, f"{cand:g} vs champion {champ:g} (limit {limit:g})")
