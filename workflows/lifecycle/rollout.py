"""Canary rollout of a challenger model version, with automatic rollback, its state in Redis.

The control plane of a rollout. A candidate that passed the gate (:mod:`workflows.lifecycle.gate`) carries the
registry alias ``challenger``; :meth:`RolloutController.start_rollout` starts sending a share of new sessions to it
(the gateway's :class:`services.rollout.RolloutRouter` reads the share), and :meth:`RolloutController.tick`, called
every few seconds by :meth:`RolloutController.run_controller`, judges each step's analysis window:

- **hold**: the window is still open, or the challenger has not served ``min_requests`` in it yet;
- **rollback**: a breach of the canary thresholds (error rate, p95 latency, p95 time to first token against the
  champion over the same window) or of the quality probes: the share drops to 0, the champion alias is left alone,
  the reasons are recorded. A breach rolls back as soon as the challenger has ``min_requests`` in the window (an
  error-rate breach even earlier, once it is certain whatever the missing requests do), without
  waiting for the window to end;
- **advance**: the window is complete and healthy, the probes pass: the next step's share, a new window;
- **promote**: the last step (100 %) passed: the registry's ``champion`` alias moves to the challenger and the
  ``challenger`` alias is deleted.

Manual :meth:`~RolloutController.promote` and :meth:`~RolloutController.abort` exist too. Every decision goes to an
audit log (a capped Redis list) with its reasons and the window's statistics.

Redis layout (``prefix`` default ``ola:rollout:``), shared by every controller and every gateway replica:

- ``{prefix}{model}:state``: the JSON of the model's current (or last) :class:`RolloutState`. Every transition is a
  compare-and-set on it (``WATCH`` / ``MULTI``, and the state's ``revision``), so concurrent ticks, promotes and aborts
  from several processes cannot interleave: one wins, the others get :class:`RolloutConflict`. At most one rollout per
  model is active (``running`` or ``promoting``).
- ``{prefix}{model}:audit``: the audit log, JSON entries, the newest last; ``{prefix}{model}:history``: finished
  rollouts' states, the newest first.
- ``{prefix}stats:{serving_version}:{bucket}``: the request samples of one serving version in one time bucket
  (``bucket_s`` seconds, wall-clock time), written by :class:`services.rollout.RolloutRecorder` through
  :func:`append_samples` and read by :func:`read_window`; each bucket is capped and expires.

Promotion is two-phase because the alias store (the MLflow registry) is not Redis: a compare-and-set moves the state
to ``promoting`` (one winner), the winner moves the aliases (idempotent), then a second compare-and-set marks it
``promoted``. A promotion whose process died between the two is finished by a later tick.

Version names: the alias store speaks registry versions (``"3"``); the gateway speaks serving versions, made with
``version_format`` (default ``{name}@{version}``: ``ola@3``), which is what the router returns and what the
recorder's statistics and the probes are keyed by.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from workflows.lifecycle.errors import LifecycleError, ModelNotFound
from workflows.lifecycle.gate import GateDecision
from workflows.lifecycle.policy import CanaryPlan, PromotionPolicy

log = logging.getLogger(__name__)

Status = Literal["running", "promoting", "promoted", "rolled_back", "aborted"]
ACTIVE: tuple[str, ...] = ("running", "promoting")
Action = Literal["idle", "hold", "advance", "promote", "rollback", "skipped"]

DEFAULT_PREFIX = "ola:rollout:"
STATS_BUCKET_S = 1.0
"""Width of the statistics' time buckets, seconds (recorder and controller must agree)."""
STATS_RETENTION_S = 3 * 3600
"""How long a statistics bucket lives in Redis."""
STATS_MAX_PER_BUCKET = 5000
"""Samples kept per version and bucket (the newest); beyond it a window's statistics come from a sample."""
CHAMPION, CHALLENGER = "champion", "challenger"
_EPS = 1e-9


class RolloutError(LifecycleError):
    """A rollout operation that cannot be done (no champion, a bad challenger, ...)."""


class GateNotPassed(RolloutError):
    """The candidate has not passed the promotion gate (no ``challenger`` alias, or another version holds it)."""


class RolloutConflict(RolloutError):
    """The rollout's state does not allow the operation, or a concurrent transition won the compare-and-set."""


# ------------------------------------------------------------------------------------------------ aliases
class AliasStore(Protocol):
    """The registry's aliases of a model (the MLflow model registry in production)."""

    def get_alias(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points to, or None when it is not set."""
        ...

    def set_alias(self, name: str, alias: str, version: str) -> None: ...

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias``; removing an alias that is not set is not an error."""
        ...


class InMemoryAliasStore:
    """Aliases in this process's memory (tests, local runs). Thread-safe; ``changes`` lists every set and delete."""

    def __init__(self, aliases: dict[tuple[str, str], str] | None = None) -> None:
        self._aliases = dict(aliases or {})
        self._lock = threading.Lock()
        self.changes: list[tuple[str, str, str, str | None]] = []  # (op, name, alias, version)

    def get_alias(self, name: str, alias: str) -> str | None:
        with self._lock:
            return self._aliases.get((name, alias))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self._lock:
            self._aliases[(name, alias)] = str(version)
            self.changes.append(("set", name, alias, str(version)))

    def delete_alias(self, name: str, alias: str) -> None:
        with self._lock:
            if self._aliases.pop((name, alias), None) is not None:
                self.changes.append(("delete", name, alias, None))


class RegistryAliasStore:
    """:class:`AliasStore` over the MLflow model registry (:class:`workflows.lifecycle.registry.ModelRegistry`).

    The registry reports a missing alias as ``ModelNotFound``; here it is None (get) or nothing to do (delete).
    """

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def get_alias(self, name: str, alias: str) -> str | None:
        try:
            return str(self.registry.get_alias(name, alias).version)
        except ModelNotFound:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.registry.set_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        try:
            self.registry.delete_alias(name, alias)
        except ModelNotFound:
            log.info("model %s: alias %s already gone", name, alias)


def nominate_challenger(aliases: AliasStore, name: str, version: str, decision: GateDecision) -> None:
    """Point the ``challenger`` alias of ``name`` at ``version`` if the gate ``decision`` passed, else raise."""
    if not decision.passed:
        raise GateNotPassed(f"{name} version {version} did not pass the gate: {'; '.join(decision.reasons)}")
    aliases.set_alias(name, CHALLENGER, version)


# ------------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class WindowStats:
    """One version's requests in an analysis window. Latency percentiles are over successful requests."""

    requests: int = 0
    errors: int = 0
    p95_latency_s: float | None = None
    p95_ttft_s: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": round(self.error_rate, 6)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowStats:
        return cls(data["requests"], data["errors"], data.get("p95_latency_s"), data.get("p95_ttft_s"))


def p95(values: list[float]) -> float | None:
    """The 95th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def stats_key(prefix: str, version: str, bucket: int) -> str:
    return f"{prefix}stats:{version}:{bucket}"


def encode_sample(t: float, ok: bool, latency_s: float, ttft_s: float | None) -> str:
    """One request outcome as stored in a bucket: ``"<t> <ok> <latency_s> <ttft_s or ->"``."""
    ttft = "-" if ttft_s is None else f"{ttft_s:.6f}"
    return f"{t:.6f} {int(bool(ok))} {latency_s:.6f} {ttft}"


def append_samples(
    client: Any,
    samples: Iterable[tuple[str, float, bool, float, float | None]],
    *,
    prefix: str = DEFAULT_PREFIX,
    bucket_s: float = STATS_BUCKET_S,
    retention_s: float = STATS_RETENTION_S,
    max_per_bucket: int = STATS_MAX_PER_BUCKET,
) -> int:
    """Write ``(version, t, ok, latency_s, ttft_s)`` samples into their buckets in one round trip; returns the count."""
    pipe = client.pipeline(transaction=False)
    touched: set[str] = set()
    n = 0
    for version, t, ok, latency_s, ttft_s in samples:
        key = stats_key(prefix, version, math.floor(t / bucket_s))
        pipe.rpush(key, encode_sample(t, ok, latency_s, ttft_s))
        touched.add(key)
        n += 1
    for key in touched:
        pipe.ltrim(key, -max_per_bucket, -1)
        pipe.expire(key, max(1, math.ceil(retention_s)))
    if n:
        pipe.execute()
    return n


def read_window(
    client: Any,
    version: str,
    start: float,
    end: float,
    *,
    prefix: str = DEFAULT_PREFIX,
    bucket_s: float = STATS_BUCKET_S,
) -> WindowStats:
    """The statistics of ``version``'s requests that finished in ``[start, end)`` (wall-clock seconds)."""
    if end <= start:
        return WindowStats()
    first, last = math.floor(start / bucket_s), math.floor(end / bucket_s)
    if last - first > 1_000_000:
        raise ValueError(f"read_window: {last - first} buckets between {start} and {end}; is bucket_s ({bucket_s}) ok?")
    pipe = client.pipeline(transaction=False)
    for bucket in range(first, last + 1):
        pipe.lrange(stats_key(prefix, version, bucket), 0, -1)
    requests = errors = 0
    latencies: list[float] = []
    ttfts: list[float] = []
    for rows in pipe.execute():
        for row in rows:
            t_s, ok_s, lat_s, ttft_s = (row.decode() if isinstance(row, bytes) else row).split(" ")
            if not start <= float(t_s) < end:
                continue
            requests += 1
            if ok_s != "1":
                errors += 1
                continue
            latencies.append(float(lat_s))
            if ttft_s != "-":
                ttfts.append(float(ttft_s))
    return WindowStats(requests, errors, p95(latencies), p95(ttfts))


# ------------------------------------------------------------------------------------------------ state
@dataclass
class RolloutEvent:
    """One transition of a rollout."""

    ts: float
    action: str  # start | advance | promote | promoted | rollback | abort
    reasons: list[str]
    step_index: int
    share: float


@dataclass
class RolloutState:
    """A rollout of ``challenger_version`` against ``champion_version`` of ``model_name`` (registry versions)."""

    id: str
    model_name: str
    champion_version: str
    challenger_version: str
    champion_serving: str  # the gateway's names of the two versions
    challenger_serving: str
    steps: list[float]
    step_index: int
    share: float  # percent of new sessions on the challenger
    status: Status
    started_at: float
    step_started_at: float
    updated_at: float
    revision: int = 0
    baseline: dict[str, Any] | None = None  # the champion's last window with enough requests (WindowStats.to_dict)
    events: list[RolloutEvent] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def routing(self) -> tuple[str, str | None, float]:
        """(champion, challenger or None, challenger share %) as the gateway should route new sessions."""
        if self.status == "running":
            return self.champion_serving, self.challenger_serving, self.share
        if self.status == "promoting":
            return self.champion_serving, self.challenger_serving, 100.0
        if self.status == "promoted":
            return self.challenger_serving, None, 0.0
        return self.champion_serving, None, 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> RolloutState:
        data = json.loads(raw)
        data["events"] = [RolloutEvent(**e) for e in data.get("events", [])]
        return cls(**data)


def state_key(prefix: str, model_name: str) -> str:
    return f"{prefix}{model_name}:state"


def load_state(client: Any, model_name: str, prefix: str = DEFAULT_PREFIX) -> RolloutState | None:
    """The model's current (or last) rollout, or None when it never had one."""
    raw = client.get(state_key(prefix, model_name))
    return None if raw is None else RolloutState.from_json(raw)


@dataclass(frozen=True)
class Decision:
    """What one :meth:`RolloutController.tick` decided, why, and the state after it."""

    action: Action
    reasons: list[str]
    state: RolloutState | None


# ------------------------------------------------------------------------------------------------ the controller
class RolloutController:
    """Starts, judges, promotes and rolls back canary rollouts of one model; any number may share one Redis.

    Args:
        redis: a ``redis://`` URL or a sync ``redis.Redis`` client.
        model_name: the registry model name (also ``{name}`` of ``version_format``).
        policy: the promotion policy (its ``canary`` plan is used).
        aliases: the registry's aliases (:class:`AliasStore`).
        probe: ``probe(serving_version) -> accuracy in [0, 1]`` over the policy's quality probes, run at the end of
            each step's window; None skips the probes (the audit log says so).
        clock: wall-clock seconds (``time.time``); the recorder's timestamps use the same clock.
        promoting_grace_s: how long a promotion may stay half-done before a tick finishes it.
    """

    def __init__(
        self,
        redis: Any,
        model_name: str,
        policy: PromotionPolicy,
        aliases: AliasStore,
        probe: Callable[[str], float] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        prefix: str = DEFAULT_PREFIX,
        version_format: str = "{name}@{version}",
        bucket_s: float = STATS_BUCKET_S,
        audit_max: int = 10_000,
        history_max: int = 100,
        promoting_grace_s: float = 30.0,
    ) -> None:
        if not model_name or model_name != model_name.strip():
            raise ValueError(f"model_name: must be non-empty without surrounding spaces, got {model_name!r}")
        if isinstance(redis, str):
            import redis as redis_lib

            redis = redis_lib.Redis.from_url(redis)
        self.redis = redis
        self.model_name = model_name
        self.policy = policy
        self.aliases = aliases
        self.probe = probe
        self.clock = clock
        self.prefix = prefix
        self.version_format = version_format
        self.bucket_s = bucket_s
        self.audit_max = audit_max
        self.history_max = history_max
        self.promoting_grace_s = promoting_grace_s
        self._state_key = state_key(prefix, model_name)
        self._audit_key = f"{prefix}{model_name}:audit"
        self._history_key = f"{prefix}{model_name}:history"

    @property
    def plan(self) -> CanaryPlan:
        return self.policy.canary

    def serving_version(self, version: str) -> str:
        """The gateway's name of registry version ``version``."""
        return self.version_format.format(name=self.model_name, version=version)

    # -------------------------------------------------------------------------------------------- reading
    def state(self) -> RolloutState | None:
        """The current (or last) rollout of the model."""
        return load_state(self.redis, self.model_name, self.prefix)

    def audit(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The audit log, oldest first (the last ``limit`` entries)."""
        start = 0 if limit is None else -limit
        return [json.loads(raw) for raw in self.redis.lrange(self._audit_key, start, -1)]

    def history(self) -> list[RolloutState]:
        """Finished rollouts, the newest first (the current one is :meth:`state`)."""
        return [RolloutState.from_json(raw) for raw in self.redis.lrange(self._history_key, 0, -1)]

    def window(self, state: RolloutState, now: float) -> tuple[WindowStats, WindowStats]:
        """(challenger, champion) statistics of the current step from its start up to ``now``.

        A step's window is at least ``window_s`` long and stays open past that until the challenger has served
        ``min_requests`` (a quiet hour does not promote anything on too little traffic).
        """
        end = now
        read = lambda v: read_window(
            self.redis, v, state.step_started_at, end, prefix=self.prefix, bucket_s=self.bucket_s
        )
        return read(state.challenger_serving), read(state.champion_serving)

    # -------------------------------------------------------------------------------------------- operations
    def check_start(self, challenger: str | None = None) -> tuple[str, str, RolloutState | None]:
        """What :meth:`start_rollout` checks first: (challenger version, champion version, the last rollout).

        Raises:
            GateNotPassed: no ``challenger`` alias, or it points to another version than ``challenger``.
            RolloutError: no ``champion`` alias, or the challenger is the champion.
            RolloutConflict: a rollout of the model is already active.
        """
        name = self.model_name
        nominated = self.aliases.get_alias(name, CHALLENGER)
        if nominated is None:
            raise GateNotPassed(f"{name}: no {CHALLENGER!r} alias; a version gets it by passing the promotion gate")
        if challenger is not None and str(challenger) != nominated:
            raise GateNotPassed(f"{name}: the {CHALLENGER!r} alias points to version {nominated}, not {challenger}")
        champion = self.aliases.get_alias(name, CHAMPION)
        if champion is None:
            raise RolloutError(f"{name}: no {CHAMPION!r} alias to roll out against; set it for a first version")
        if champion == nominated:
            raise RolloutError(f"{name}: version {nominated} is already the champion")
        previous = self.state()
        if previous is not None and previous.active:
            raise RolloutConflict(f"{name}: rollout {previous.id} is already {previous.status}")
        return nominated, champion, previous

    def start_rollout(self, challenger: str | None = None, now: float | None = None) -> RolloutState:
        """Start a rollout of the version the ``challenger`` alias points to (must be ``challenger`` if given).

        Raises:
            GateNotPassed: no ``challenger`` alias, or it points to another version.
            RolloutError: no ``champion`` alias, or the challenger is the champion.
            RolloutConflict: a rollout of the model is already active.
        """
        now = self.clock() if now is None else now
        name = self.model_name
        nominated, champion, previous = self.check_start(challenger)
        steps = list(self.plan.steps)
        reasons = [f"challenger {nominated} against champion {champion}; steps {steps} % of new sessions"]
        state = RolloutState(
            id=uuid.uuid4().hex[:12],
            model_name=name,
            champion_version=champion,
            challenger_version=nominated,
            champion_serving=self.serving_version(champion),
            challenger_serving=self.serving_version(nominated),
            steps=steps,
            step_index=0,
            share=steps[0],
            status="running",
            started_at=now,
            step_started_at=now,
            updated_at=now,
            revision=0,
            events=[RolloutEvent(now, "start", reasons, 0, steps[0])],
        )
        self._commit(previous, state, self._entry(state, "start", reasons, now), archive=previous is not None)
        log.info("rollout %s of %s started: %s", state.id, name, reasons[0])
        return state

    def tick(self, now: float | None = None) -> Decision:
        """Judge the active rollout's current step once: hold, advance, promote or roll back."""
        now = self.clock() if now is None else now
        state = self.state()
        if state is None or not state.active:
            return Decision("idle", ["no rollout running"], state)
        try:
            if state.status == "promoting":
                if now - state.updated_at < self.promoting_grace_s:
                    return Decision("hold", ["promotion in progress"], state)
                return Decision("promote", ["finished a promotion left half-done"], self._finish_promotion(state, now))
            return self._judge(state, now)
        except RolloutConflict as exc:
            log.info("rollout %s: tick skipped: %s", state.id, exc)
            return Decision("skipped", [str(exc)], self.state())

    def promote(self, reason: str = "manual promote", now: float | None = None) -> RolloutState:
        """Promote the running rollout's challenger now (whatever its step). Exactly one concurrent caller wins.

        Raises:
            RolloutConflict: no rollout running (none, finished, or promoted by a concurrent call).
        """
        for _ in range(20):
            now = self.clock() if now is None else now
            state = self._require_running("promote")
            try:
                promoting = self._begin_promotion(state, [reason], now)
            except RolloutConflict:
                continue  # the state moved (a tick advanced it, say): look again
            return self._finish_promotion(promoting, now)
        raise RolloutConflict(f"{self.model_name}: promote lost too many races; try again")

    def abort(self, reason: str = "manual abort", now: float | None = None) -> RolloutState:
        """Stop the running rollout: share 0, champion unchanged, status ``aborted``.

        Raises:
            RolloutConflict: no rollout running (none, finished, or promoting).
        """
        for _ in range(20):
            now = self.clock() if now is None else now
            state = self._require_running("abort")
            new = self._next(state, now, status="aborted", share=0.0, action="abort", reasons=[reason])
            try:
                self._commit(state, new, self._entry(new, "abort", [reason], now))
            except RolloutConflict:
                continue
            log.warning("rollout %s of %s aborted: %s", state.id, self.model_name, reason)
            return new
        raise RolloutConflict(f"{self.model_name}: abort lost too many races; try again")

    def run_controller(
        self, interval: float = 5.0, stop: threading.Event | None = None, max_ticks: int | None = None
    ) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set (or ``max_ticks`` ticks); errors are logged."""
        tick_forever(self.tick, self.model_name, interval, stop, max_ticks)

    # -------------------------------------------------------------------------------------------- judging
    def _judge(self, state: RolloutState, now: float) -> Decision:
        plan = self.plan
        challenger, champion = self.window(state, now)
        baseline = champion if champion.requests >= plan.min_requests else None
        if baseline is None and state.baseline is not None:
            baseline = WindowStats.from_dict(state.baseline)
        stats = {"challenger": challenger.to_dict(), "champion": champion.to_dict()}
        window_end = state.step_started_at + plan.window_s
        if challenger.requests >= plan.min_requests:
            breaches = self._breaches(challenger, baseline)
            if breaches:
                return self._rollback(state, breaches, now, stats)
        else:
            certain = self._certain_error_breach(challenger, baseline)
            if certain:
                return self._rollback(state, [certain], now, stats)
        if now < window_end:
            reasons = [
                f"window open: {challenger.requests}/{plan.min_requests} challenger requests, "
                f"{window_end - now:.1f} s left"
            ]
            return self._hold(state, reasons, now, stats)
        if challenger.requests < plan.min_requests:
            reasons = [
                f"window complete but only {challenger.requests}/{plan.min_requests} challenger requests; "
                "waiting for traffic"
            ]
            return self._hold(state, reasons, now, stats)
        reasons = [
            f"step {state.step_index} ({state.share:g} %) healthy: challenger {challenger.requests} requests, "
            f"error rate {challenger.error_rate:.3f}, p95 {_fmt(challenger.p95_latency_s)} s, "
            f"p95 TTFT {_fmt(challenger.p95_ttft_s)} s"
        ]
        if baseline is None:
            reasons.append("no champion baseline with enough requests: latency ratios not checked")
        probe_failure = self._run_probes(state, reasons)
        if probe_failure:
            return self._rollback(state, [probe_failure], now, stats)
        fresh_baseline = champion.to_dict() if champion.requests >= plan.min_requests else state.baseline
        if state.step_index == len(state.steps) - 1:
            promoting = self._begin_promotion(state, reasons, now, stats, fresh_baseline)
            return Decision("promote", reasons, self._finish_promotion(promoting, now))
        index = state.step_index + 1
        new = self._next(state, now, step_index=index, share=state.steps[index], step_started_at=now)
        new.baseline = fresh_baseline
        reasons.append(f"advance to step {index}: {new.share:g} % of new sessions")
        new.events.append(RolloutEvent(now, "advance", reasons, index, new.share))
        self._commit(state, new, self._entry(new, "advance", reasons, now, stats))
        log.info("rollout %s advanced to step %d (%g %%)", state.id, index, new.share)
        return Decision("advance", reasons, new)

    def _certain_error_breach(self, challenger: WindowStats, baseline: WindowStats | None) -> str | None:
        """A breach already certain before ``min_requests``: the challenger's errors exceed the allowed error rate
        even if every request still missing to ``min_requests`` succeeds. Deciding then cannot change the verdict and
        cuts the reaction time at low traffic (a dead challenger fails every request it gets)."""
        if challenger.errors == 0:
            return None
        minimum = self.plan.min_requests
        base_rate = baseline.error_rate if baseline is not None else 0.0
        best_case = challenger.errors / minimum  # the remaining requests all succeed
        if best_case - base_rate > self.plan.thresholds.max_error_rate_increase + _EPS:
            return (
                f"error rate certain to breach: {challenger.errors} errors in {challenger.requests} requests, at least "
                f"{best_case:.3f} over min_requests {minimum} vs champion {base_rate:.3f} (max_error_rate_increase "
                f"{self.plan.thresholds.max_error_rate_increase:g})"
            )
        return None

    def _breaches(self, challenger: WindowStats, baseline: WindowStats | None) -> list[str]:
        limits = self.plan.thresholds
        breaches = []
        base_rate = baseline.error_rate if baseline is not None else 0.0
        if challenger.error_rate - base_rate > limits.max_error_rate_increase + _EPS:
            breaches.append(
                f"error rate {challenger.error_rate:.3f} ({challenger.errors}/{challenger.requests}) vs champion "
                f"{base_rate:.3f}: increase over max_error_rate_increase {limits.max_error_rate_increase:g}"
            )
        if baseline is None:
            return breaches
        for what, mine, theirs, limit, key in (
            (
                "p95 latency",
                challenger.p95_latency_s,
                baseline.p95_latency_s,
                limits.max_p95_latency_ratio,
                "max_p95_latency_ratio",
            ),
            ("p95 TTFT", challenger.p95_ttft_s, baseline.p95_ttft_s, limits.max_ttft_ratio, "max_ttft_ratio"),
        ):
            if mine is None or theirs is None or theirs <= 0:
                continue
            if mine / theirs > limit + _EPS:
                breaches.append(
                    f"{what} {mine:.3f} s is {mine / theirs:.2f}x the champion's {theirs:.3f} s, over {key} {limit:g}"
                )
        return breaches

    def _run_probes(self, state: RolloutState, reasons: list[str]) -> str | None:
        """Run the quality probes on the challenger; the failure reason, or None (a note goes to ``reasons``)."""
        if self.probe is None:
            reasons.append("no quality probe configured: probes skipped")
            return None
        minimum = self.plan.thresholds.min_probe_accuracy
        try:
            accuracy = float(self.probe(state.challenger_serving))
        except Exception as exc:
            return f"quality probes could not run on {state.challenger_serving}: {type(exc).__name__}: {exc}"
        if not math.isfinite(accuracy) or accuracy < minimum - _EPS:
            return f"probe accuracy {accuracy:.3f} is under min_probe_accuracy {minimum:g}"
        reasons.append(f"probe accuracy {accuracy:.3f} >= {minimum:g}")
        return None

    # -------------------------------------------------------------------------------------------- transitions
    def _hold(self, state: RolloutState, reasons: list[str], now: float, stats: dict[str, Any]) -> Decision:
        self._append_audit(self._entry(state, "hold", reasons, now, stats))
        return Decision("hold", reasons, state)

    def _rollback(self, state: RolloutState, reasons: list[str], now: float, stats: dict[str, Any]) -> Decision:
        new = self._next(state, now, status="rolled_back", share=0.0, action="rollback", reasons=reasons)
        self._commit(state, new, self._entry(new, "rollback", reasons, now, stats))
        log.warning("rollout %s of %s rolled back: %s", state.id, self.model_name, "; ".join(reasons))
        return Decision("rollback", reasons, new)

    def _begin_promotion(
        self,
        state: RolloutState,
        reasons: list[str],
        now: float,
        stats: dict[str, Any] | None = None,
        baseline: dict[str, Any] | None = None,
    ) -> RolloutState:
        new = self._next(state, now, status="promoting", share=100.0, action="promote", reasons=reasons)
        if baseline is not None:
            new.baseline = baseline
        self._commit(state, new, self._entry(new, "promote", reasons, now, stats))
        return new

    def _finish_promotion(self, state: RolloutState, now: float) -> RolloutState:
        name, version = self.model_name, state.challenger_version
        self.aliases.set_alias(name, CHAMPION, version)  # idempotent: a retry sets the same value
        if self.aliases.get_alias(name, CHALLENGER) == version:
            self.aliases.delete_alias(name, CHALLENGER)
        reasons = [f"{CHAMPION!r} alias moved from version {state.champion_version} to {version}"]
        new = self._next(state, now, status="promoted", share=100.0, action="promoted", reasons=reasons)
        try:
            self._commit(state, new, self._entry(new, "promoted", reasons, now))
        except RolloutConflict:
            current = self.state()
            if current is not None and current.id == state.id and current.status == "promoted":
                return current  # a recovering tick finished the same promotion first
            raise
        log.info("rollout %s: %s version %s promoted to champion", state.id, name, version)
        return new

    def _require_running(self, what: str) -> RolloutState:
        state = self.state()
        if state is None:
            raise RolloutConflict(f"{self.model_name}: cannot {what}: no rollout")
        if state.status != "running":
            raise RolloutConflict(f"{self.model_name}: cannot {what}: rollout {state.id} is {state.status}")
        return state

    def _next(
        self, state: RolloutState, now: float, action: str | None = None, reasons: list[str] | None = None, **changes
    ) -> RolloutState:
        new = replace(state, **changes, updated_at=now, revision=state.revision + 1, events=list(state.events))
        if action is not None:
            new.events.append(RolloutEvent(now, action, list(reasons or []), new.step_index, new.share))
        return new

    def _entry(
        self, state: RolloutState, action: str, reasons: list[str], now: float, stats: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        entry = {
            "ts": now,
            "rollout_id": state.id,
            "model_name": self.model_name,
            "action": action,
            "status": state.status,
            "step_index": state.step_index,
            "share": state.share,
            "champion": state.champion_version,
            "challenger": state.challenger_version,
            "reasons": list(reasons),
        }
        if stats is not None:
            entry["stats"] = stats
        return entry

    def _append_audit(self, entry: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(self._audit_key, json.dumps(entry, sort_keys=True))
        pipe.ltrim(self._audit_key, -self.audit_max, -1)
        pipe.execute()

    def _commit(
        self, expected: RolloutState | None, new: RolloutState, entry: dict[str, Any], archive: bool = False
    ) -> None:
        """Compare-and-set: write ``new`` (and its audit entry) only if the stored state is still ``expected``."""
        import redis as redis_lib

        key = self._state_key
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                current = None if raw is None else RolloutState.from_json(raw)
                same = (current is None and expected is None) or (
                    current is not None
                    and expected is not None
                    and (current.id, current.revision) == (expected.id, expected.revision)
                )
                if not same:
                    now_is = "nothing" if current is None else f"{current.id} r{current.revision} {current.status}"
                    raise RolloutConflict(f"{self.model_name}: the rollout changed concurrently (now {now_is})")
                pipe.multi()
                if archive and current is not None:
                    pipe.lpush(self._history_key, current.to_json())
                    pipe.ltrim(self._history_key, 0, self.history_max - 1)
                pipe.set(key, new.to_json())
                pipe.rpush(self._audit_key, json.dumps(entry, sort_keys=True))
                pipe.ltrim(self._audit_key, -self.audit_max, -1)
                pipe.execute()
            except redis_lib.WatchError:
                raise RolloutConflict(f"{self.model_name}: the rollout changed concurrently") from None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def tick_forever(
    tick: Callable[[], Decision],
    model_name: str,
    interval: float = 5.0,
    stop: threading.Event | None = None,
    max_ticks: int | None = None,
    after: Callable[[], None] | None = None,
) -> None:
    """Call ``tick`` (then ``after``) every ``interval`` seconds until ``stop`` is set or ``max_ticks`` ticks ran.

    A failing tick is logged and the loop goes on (Redis down, a failing alias store); ``after`` logs its own errors.
    """
    if interval <= 0:
        raise ValueError(f"interval: must be > 0 seconds, got {interval}")
    stop = stop or threading.Event()
    ticks = 0
    while not stop.is_set() and (max_ticks is None or ticks < max_ticks):
        try:
            decision = tick()
            if decision.action not in ("idle", "hold"):
                log.info("rollout tick: %s (%s)", decision.action, "; ".join(decision.reasons))
        except Exception:
            log.exception("rollout tick of %s failed", model_name)
        if after is not None:
            after()
        ticks += 1
        stop.wait(interval)
