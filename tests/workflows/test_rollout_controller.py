"""The canary controller on a real Redis: steps, rollback on breaches, promotion, restarts and concurrent transitions.

Time is an injected wall clock shared by the controller and the recorder, so one-second analysis windows pass
instantly and every decision is deterministic. Request outcomes go through the real recorder into Redis buckets.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid

import pytest
import redis

from services.rollout import RolloutRecorder, RolloutRouter
from workflows.lifecycle.gate import decide
from workflows.lifecycle.policy import PromotionPolicy
from workflows.lifecycle.rollout import (
    GateNotPassed,
    InMemoryAliasStore,
    RegistryAliasStore,
    RolloutConflict,
    RolloutController,
    RolloutError,
    RolloutState,
    append_samples,
    nominate_challenger,
    read_window,
    stats_key,
)

WINDOW_S = 1.0
MIN_REQUESTS = 20
POLICY = PromotionPolicy.from_mapping(
    {
        "gate": {"metrics": {"acc": {"direction": "higher", "tolerance": 0.01}}},
        "canary": {
            "steps": [5, 25, 50, 100],
            "window_s": WINDOW_S,
            "min_requests": MIN_REQUESTS,
            "thresholds": {
                "max_error_rate_increase": 0.05,
                "max_p95_latency_ratio": 1.5,
                "max_ttft_ratio": 1.5,
                "min_probe_accuracy": 0.8,
            },
        },
    }
)


class Clock:
    """An injectable wall clock that moves only when told."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Probe:
    """A quality probe stand-in with a fixed accuracy (the controller's seam), counting its calls."""

    def __init__(self, accuracy: float = 1.0, error: Exception | None = None) -> None:
        self.accuracy = accuracy
        self.error = error
        self.calls: list[str] = []

    def __call__(self, version: str) -> float:
        self.calls.append(version)
        if self.error is not None:
            raise self.error
        return self.accuracy


class Env:
    """One model's rollout world: aliases champion=1 / challenger=2, a clock, a recorder, controllers on demand."""

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"
        self.model = "ola"
        self.aliases = InMemoryAliasStore({(self.model, "champion"): "1", (self.model, "challenger"): "2"})
        self.clock = Clock()
        self.recorder = RolloutRecorder(redis_url, prefix=self.prefix, clock=self.clock, start=False)
        self.probe = Probe()

    def controller(self, **kw) -> RolloutController:
        kw.setdefault("probe", self.probe)
        return RolloutController(
            self.url, self.model, kw.pop("policy", POLICY), self.aliases, clock=self.clock, prefix=self.prefix, **kw
        )

    def traffic(
        self, champion: int = 40, challenger: int = 30, errors: float = 0.0, latency: float = 0.1, ttft: float = 0.02
    ) -> None:
        """Spread requests of both versions over half a window; the challenger's with its error share and speed."""
        n = max(champion, challenger)
        for i in range(n):
            self.clock.advance(WINDOW_S / 2 / n)
            if i < champion:
                self.recorder.record("ola@1", True, 0.1, 0.02)
            if i < challenger:
                failed = i < round(errors * challenger)
                self.recorder.record("ola@2", not failed, latency, None if failed else ttft)
        assert self.recorder.flush() == champion + challenger

    def audit_actions(self, controller: RolloutController) -> list[str]:
        return [e["action"] for e in controller.audit()]


@pytest.fixture
def env(redis_url) -> Env:
    return Env(redis_url)


# ------------------------------------------------------------------------------------------------ happy path
def test_a_good_challenger_advances_through_every_step_and_is_promoted(env):
    ctl = env.controller()
    state = ctl.start_rollout("2")
    assert (state.status, state.share, state.champion_serving, state.challenger_serving) == (
        "running",
        5,
        "ola@1",
        "ola@2",
    )
    shares = []
    for step in range(4):
        last = step == 3
        env.traffic(champion=0 if last else 40)  # at 100 % the champion gets no new sessions
        held = ctl.tick()
        assert held.action == "hold" and held.reasons[0].startswith("window open: 30/20")
        env.clock.advance(WINDOW_S * 0.51)  # just past the window's end
        decision = ctl.tick()
        shares.append(decision.state.share)
        assert decision.action == ("promote" if last else "advance"), decision.reasons
        if last:
            assert not any("no champion baseline" in r for r in decision.reasons)  # the earlier step's baseline
    assert shares == [25, 50, 100, 100]
    final = ctl.state()
    assert final.status == "promoted" and final.routing() == ("ola@2", None, 0.0)
    assert env.aliases.get_alias("ola", "champion") == "2" and env.aliases.get_alias("ola", "challenger") is None
    assert [e.action for e in final.events] == ["start", "advance", "advance", "advance", "promote", "promoted"]
    assert env.probe.calls == ["ola@2"] * 4  # once at the end of every step
    actions = env.audit_actions(ctl)
    assert actions.count("promote") == 1 and actions.count("hold") == 4 and actions[0] == "start"
    healthy = next(e for e in ctl.audit() if e["action"] == "advance")
    assert healthy["stats"]["challenger"]["requests"] == 30 and healthy["stats"]["champion"]["requests"] == 40
    assert ctl.tick().action == "idle"


def test_a_window_without_enough_traffic_holds_and_stays_open(env):
    ctl = env.controller()
    ctl.start_rollout()
    env.traffic(challenger=5)
    env.clock.advance(WINDOW_S * 3)
    decision = ctl.tick()
    assert decision.action == "hold" and "only 5/20 challenger requests" in decision.reasons[0]
    assert ctl.state().revision == 0 and env.probe.calls == []
    env.traffic(challenger=20)  # late traffic still counts: the window grows until it has enough
    assert ctl.tick().action == "advance"


# ------------------------------------------------------------------------------------------------ rollback
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("errors", "error rate 0.300"),
        ("slow", "p95 latency"),
        ("slow_ttft", "p95 TTFT"),
        ("bad_probes", "probe accuracy 0.400 is under min_probe_accuracy 0.8"),
        ("broken_probes", "quality probes could not run on ola@2: RuntimeError: no replica"),
    ],
)
def test_a_bad_challenger_is_rolled_back_within_the_first_window(env, kind, reason):
    if kind == "bad_probes":
        env.probe.accuracy = 0.4
    if kind == "broken_probes":
        env.probe.error = RuntimeError("no replica")
    ctl = env.controller()
    started = ctl.start_rollout("2")
    env.traffic(
        errors=0.3 if kind == "errors" else 0.0,
        latency=0.5 if kind == "slow" else 0.1,
        ttft=0.2 if kind == "slow_ttft" else 0.02,
    )
    decision = ctl.tick()
    if kind in ("bad_probes", "broken_probes"):  # probes run when the window completes
        assert decision.action == "hold"
        env.clock.advance(WINDOW_S * 0.51)  # just past the window's end
        decision = ctl.tick()
    assert env.clock.t - started.started_at <= WINDOW_S * 1.02  # within one analysis window
    assert decision.action == "rollback"
    assert any(reason in r for r in decision.reasons), decision.reasons
    state = ctl.state()
    assert (state.status, state.share, state.step_index) == ("rolled_back", 0.0, 0)
    assert state.routing() == ("ola@1", None, 0.0)
    assert state.events[-1].action == "rollback" and state.events[-1].reasons == decision.reasons
    assert env.aliases.get_alias("ola", "champion") == "1"
    assert [c for c in env.aliases.changes if c[2] == "champion"] == []
    rollback = ctl.audit()[-1]
    assert rollback["action"] == "rollback" and rollback["reasons"] == decision.reasons
    assert rollback["stats"]["challenger"]["requests"] == 30
    assert ctl.tick().action == "idle"
    with pytest.raises(RolloutConflict, match="rolled_back"):
        ctl.promote()


# ------------------------------------------------------------------------------------------------ manual and starts
def test_manual_abort_and_a_new_rollout_after_it(env):
    ctl = env.controller()
    first = ctl.start_rollout()
    aborted = ctl.abort("latency alarms from on-call")
    assert (aborted.status, aborted.share) == ("aborted", 0.0)
    assert aborted.events[-1].reasons == ["latency alarms from on-call"]
    assert env.aliases.get_alias("ola", "champion") == "1"
    with pytest.raises(RolloutConflict, match="aborted"):
        ctl.abort()
    assert ctl.tick().action == "idle"
    second = ctl.start_rollout()
    assert second.id != first.id and [h.id for h in ctl.history()] == [first.id]
    assert env.audit_actions(ctl) == ["start", "abort", "start"]


def test_manual_promote_skips_the_remaining_steps(env):
    ctl = env.controller()
    ctl.start_rollout()
    promoted = ctl.promote("release manager approved")
    assert promoted.status == "promoted"
    assert env.aliases.get_alias("ola", "champion") == "2" and env.aliases.get_alias("ola", "challenger") is None
    assert promoted.events[-2].action == "promote" and promoted.events[-2].reasons == ["release manager approved"]


def test_starting_needs_a_gated_challenger_a_champion_and_no_active_rollout(env):
    ctl = env.controller()
    with pytest.raises(GateNotPassed, match="points to version 2, not 3"):
        ctl.start_rollout("3")
    env.aliases.delete_alias("ola", "challenger")
    with pytest.raises(GateNotPassed, match="no 'challenger' alias"):
        ctl.start_rollout()
    failing = decide({"acc": 0.5}, {"acc": 0.9}, POLICY)
    with pytest.raises(GateNotPassed, match=r"did not pass the gate: acc: 0\.5 is below"):
        nominate_challenger(env.aliases, "ola", "3", failing)
    assert env.aliases.get_alias("ola", "challenger") is None
    nominate_challenger(env.aliases, "ola", "3", decide({"acc": 0.95}, {"acc": 0.9}, POLICY))
    assert env.aliases.get_alias("ola", "challenger") == "3"
    env.aliases.delete_alias("ola", "champion")
    with pytest.raises(RolloutError, match="no 'champion' alias"):
        ctl.start_rollout()
    env.aliases.set_alias("ola", "champion", "3")
    with pytest.raises(RolloutError, match="already the champion"):
        ctl.start_rollout()
    env.aliases.set_alias("ola", "champion", "1")
    ctl.start_rollout("3")
    with pytest.raises(RolloutConflict, match="already running"):
        env.controller().start_rollout("3")


# ------------------------------------------------------------------------------------------------ restarts
def test_a_restart_mid_rollout_keeps_the_state(env):
    ctl = env.controller()
    started = ctl.start_rollout()
    env.traffic()
    env.clock.advance(WINDOW_S)
    assert ctl.tick().action == "advance"
    # every process restarts: new controller, recorder and router objects with their own connections
    env.recorder = RolloutRecorder(env.url, prefix=env.prefix, clock=env.clock, start=False)
    again = env.controller()
    state = again.state()
    assert (state.id, state.step_index, state.share, state.status) == (started.id, 1, 25, "running")
    router = RolloutRouter(env.url, "ola", "ola@1", prefix=env.prefix, start=False)
    assert router.refresh() and router.snapshot.share == 25 and router.snapshot.challenger == "ola@2"
    for _ in range(3):
        env.traffic(champion=40)
        env.clock.advance(WINDOW_S)
        decision = again.tick()
    assert decision.action == "promote" and again.state().status == "promoted"
    assert router.refresh() and router("any-session") == "ola@2"


def test_a_promotion_left_half_done_is_finished_by_a_later_tick(env):
    ctl = env.controller(promoting_grace_s=10.0)
    state = ctl.start_rollout()
    ctl._begin_promotion(state, ["the promoting process dies here"], env.clock())  # phase one only
    assert ctl.state().status == "promoting" and env.aliases.get_alias("ola", "champion") == "1"
    assert ctl.tick().action == "hold"  # within the grace period the promoter may still be at work
    with pytest.raises(RolloutConflict, match="promoting"):
        ctl.abort()
    env.clock.advance(11.0)
    decision = env.controller(promoting_grace_s=10.0).tick()  # another process, after the grace period
    assert decision.action == "promote" and decision.state.status == "promoted"
    assert env.aliases.get_alias("ola", "champion") == "2"


def test_run_controller_ticks_until_stopped(env):
    single = PromotionPolicy.from_mapping(
        {**POLICY.model_dump(exclude={"probe_set"}), "canary": {**POLICY.canary.model_dump(), "steps": [100]}}
    )
    ctl = env.controller(policy=single)
    ctl.start_rollout()
    env.traffic(champion=40)
    env.clock.advance(WINDOW_S)
    stop = threading.Event()
    loop = threading.Thread(target=ctl.run_controller, args=(0.02, stop))
    loop.start()
    deadline = time.monotonic() + 10
    while ctl.state().status != "promoted" and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    loop.join(5)
    assert not loop.is_alive() and ctl.state().status == "promoted"
    with pytest.raises(ValueError, match="interval"):
        ctl.run_controller(0)


# ------------------------------------------------------------------------------------------------ concurrency
def test_concurrent_promotes_from_threads_leave_one_champion_and_one_transition(env):
    env.controller().start_rollout()
    n = 8
    barrier = threading.Barrier(n)
    results: list[str] = []

    def promote() -> None:
        ctl = env.controller()  # each with its own Redis connections
        barrier.wait()
        try:
            ctl.promote(f"thread {threading.get_ident()}")
            results.append("won")
        except RolloutConflict:
            results.append("conflict")

    threads = [threading.Thread(target=promote) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["conflict"] * (n - 1) + ["won"]
    assert [c for c in env.aliases.changes if c[2] == "champion"] == [("set", "ola", "champion", "2")]
    ctl = env.controller()
    assert env.audit_actions(ctl) == ["start", "promote", "promoted"]
    assert [e.action for e in ctl.state().events] == ["start", "promote", "promoted"]


def _promote_in_process(url: str, prefix: str, barrier, queue) -> None:
    aliases = InMemoryAliasStore({("ola", "champion"): "1", ("ola", "challenger"): "2"})
    ctl = RolloutController(url, "ola", POLICY, aliases, prefix=prefix)
    barrier.wait()
    try:
        ctl.promote()
        queue.put(("won", aliases.changes))
    except RolloutConflict:
        queue.put(("conflict", aliases.changes))


def test_concurrent_promotes_from_processes(env):
    env.controller().start_rollout()
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_promote_in_process, args=(env.url, env.prefix, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sorted(r[0] for r in results) == ["conflict"] * (n - 1) + ["won"]
    winner = next(changes for outcome, changes in results if outcome == "won")
    assert ("set", "ola", "champion", "2") in winner
    assert all(changes == [] for outcome, changes in results if outcome == "conflict")
    assert env.audit_actions(env.controller()) == ["start", "promote", "promoted"]


def test_concurrent_ticks_advance_a_step_once(env):
    env.controller().start_rollout()
    env.traffic()
    env.clock.advance(WINDOW_S)
    n = 6
    barrier = threading.Barrier(n)
    actions: list[str] = []

    def tick() -> None:
        ctl = env.controller()
        barrier.wait()
        actions.append(ctl.tick().action)

    threads = [threading.Thread(target=tick) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert actions.count("advance") == 1 and set(actions) <= {"advance", "skipped", "hold"}
    state = env.controller().state()
    assert (state.step_index, state.share, state.revision) == (1, 25, 1)
    assert env.audit_actions(env.controller()).count("advance") == 1


# ------------------------------------------------------------------------------------------------ statistics
def test_window_statistics_from_the_buckets(redis_url):
    client = redis.Redis.from_url(redis_url)
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    t0 = 1_700_000_000.0
    samples = [("v@1", t0 + i * 0.05, i % 10 != 0, 0.01 * (i + 1), 0.001 * (i + 1)) for i in range(100)]
    samples.append(("v@1", t0 + 1.0, True, 9.0, None))  # a request without a first token
    assert append_samples(client, samples, prefix=prefix, bucket_s=1.0, retention_s=60) == 101
    stats = read_window(client, "v@1", t0, t0 + 5.0, prefix=prefix, bucket_s=1.0)
    assert (stats.requests, stats.errors) == (101, 10) and stats.error_rate == pytest.approx(10 / 101)
    ok_latencies = sorted([0.01 * (i + 1) for i in range(100) if i % 10 != 0] + [9.0])
    assert stats.p95_latency_s == pytest.approx(ok_latencies[86])  # nearest rank: the ceil(0.95 * 91) = 87th
    assert read_window(client, "v@1", t0 + 2.0, t0 + 3.0, prefix=prefix, bucket_s=1.0).requests == 20
    assert read_window(client, "v@1", t0, t0, prefix=prefix).requests == 0
    assert read_window(client, "v@2", t0, t0 + 5.0, prefix=prefix).p95_latency_s is None
    assert 0 < client.ttl(stats_key(prefix, "v@1", int(t0))) <= 60
    # each bucket keeps only its newest samples
    many = [("v@3", t0 + 0.001 * i, True, 0.1, 0.01) for i in range(50)]
    append_samples(client, many, prefix=prefix, bucket_s=1.0, max_per_bucket=10)
    assert client.llen(stats_key(prefix, "v@3", int(t0))) == 10


def test_state_round_trips_through_json(env):
    state = env.controller().start_rollout()
    raw = redis.Redis.from_url(env.url).get(f"{env.prefix}ola:state")
    assert RolloutState.from_json(raw) == state
    assert json.loads(raw)["events"][0]["action"] == "start"


# ------------------------------------------------------------------------------------------------ real MLflow
def test_a_promotion_moves_the_aliases_of_a_real_mlflow_registry(mlflow_server, redis_url):
    from workflows.lifecycle.registry import ModelRegistry

    registry = ModelRegistry(mlflow_server)
    name = f"rollout-{uuid.uuid4().hex[:8]}"
    registry.client.create_registered_model(name)
    for _ in range(2):
        registry.client.create_model_version(name, source=f"s3://media/mlflow/{name}/model")
    registry.client.set_registered_model_alias(name, "champion", "1")
    registry.client.set_registered_model_alias(name, "challenger", "2")
    aliases = RegistryAliasStore(registry)
    ctl = RolloutController(redis_url, name, POLICY, aliases, Probe(), prefix=f"test:{uuid.uuid4().hex[:8]}:")
    assert ctl.start_rollout("2").champion_serving == f"{name}@1"
    ctl.promote("approved")
    assert registry.get_alias(name, "champion").version == "2"
    assert aliases.get_alias(name, "challenger") is None  # a missing alias reads as None, not an error


@pytest.mark.parametrize(("errors", "action"), [(1, "hold"), (2, "rollback")])
def test_an_error_breach_certain_before_min_requests_rolls_back_at_once(env, errors, action):
    """Low traffic: a dead challenger is judged as soon as its errors alone exceed the allowed rate over
    ``min_requests``, whatever the missing requests would do (2 errors: at least 2/20 = 0.10 > 0.05); one error
    (1/20 = 0.05, not over the limit) waits for the traffic."""
    ctl = env.controller()
    ctl.start_rollout("2")
    env.traffic(challenger=3, errors=errors / 3)
    decision = ctl.tick()
    assert decision.action == action, decision.reasons
    if action == "hold":
        assert "window open: 3/20" in decision.reasons[0]
        assert ctl.state().status == "running"
    else:
        assert f"error rate certain to breach: {errors} errors in 3 requests" in decision.reasons[0]
        assert ctl.state().status == "rolled_back" and env.aliases.get_alias("ola", "champion") == "1"
