"""Lifecycle timing: from a finished training stage to champion, and how fast a failing challenger is rolled back.

1. **Time to champion.** A stage output directory (``--stage-dir``; default: a fresh ``ola init --preset tiny``) is
   taken through the whole lifecycle, each phase timed: registration in the MLflow registry (checkpoint uploaded to
   S3, version created) -> the promotion gate on the given evaluation metrics and the ``challenger`` alias -> deploy
   (download from the registry, load, serve) -> the canary steps of the promotion policy, each step's analysis window
   replaced by ``--window-s``, judged by a real :class:`~workflows.lifecycle.rollout.RolloutController` from the
   outcomes a real gateway records of real chats sent at a fixed rate -> promoted (the ``champion`` alias moved).
2. **Rollback reaction.** Another version goes into a canary; once it has served healthy requests in its first step,
   its LLM server is stopped (the breach begins: its chats fail). Measured: how long until the controller rolls it
   back, and until the gateway's router stops sending it new sessions, against the analysis window (target: within
   one window).

Everything is real and on loopback: Redis, an S3 server (moto), ``mlflow server`` with its artifacts in S3 (started
here like the test fixtures do, or the URLs of running ones: ``--redis-url``, ``--s3-endpoint``, ``--tracking-uri``),
grpc.aio LLM servers (one per model version, as separate replica sets would be) behind an omni gateway with the
rollout router and recorder.

Run: ``.venv/bin/python -m bench.lifecycle [--window-s 5] [--rate 20] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import format_table, machine_info, write_json

log = logging.getLogger("bench.lifecycle")

# Metrics of the shipped gate (workflows/configs/lifecycle/promotion.yaml): the champion's, and a candidate's that pass.
CHAMPION_METRICS = {"image_qa_accuracy": 0.60, "ocr_accuracy": 0.40, "video_qa_accuracy": 0.50, "asr_wer": 0.15}
CANDIDATE_METRICS = {"image_qa_accuracy": 0.62, "ocr_accuracy": 0.41, "video_qa_accuracy": 0.51, "asr_wer": 0.14}
_START_TIMEOUT_S = 120.0
WARMUP_CHATS = 3  # pinned chats a deployed version answers before it is routed to


# ------------------------------------------------------------------------------------------------ servers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def _http_ok(url: str) -> bool:
    return urllib.request.urlopen(url, timeout=1).status == 200


class Servers:
    """Redis, S3 (moto) and an MLflow server on loopback: the given URLs, or processes started (and stopped) here."""

    def __init__(self, workdir: Path, redis_url: str | None, s3_endpoint: str | None, tracking_uri: str | None) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.start_s: dict[str, float] = {}
        try:
            self.redis_url = redis_url or self._redis()
            self.s3_endpoint = s3_endpoint or self._moto()
            self.tracking_uri = tracking_uri or self._mlflow()
        except BaseException:
            self.close()
            raise

    def _spawn(self, what: str, argv: list[str], ready: Any, env: dict[str, str] | None = None) -> None:
        started = time.perf_counter()
        out = open(self.workdir / f"{what}.log", "wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        out.close()
        self.procs.append((what, proc))
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = (self.workdir / f"{what}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited with status {proc.returncode}: {tail}")
            try:
                if ready():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within {_START_TIMEOUT_S} s")
            time.sleep(0.1)
        self.start_s[what] = time.perf_counter() - started
        log.info("%s up in %.1f s", what, self.start_s[what])

    def _redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (scripts/install-system.sh), or pass --redis-url")
        port = _free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._spawn("redis-server", [*argv, "--dir", str(self.workdir)], lambda: _redis_ping(port))
        return f"redis://127.0.0.1:{port}/0"

    def _moto(self) -> str:
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            raise SystemExit("moto_server is not installed (pip install 'moto[server]'), or pass --s3-endpoint")
        for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
            os.environ.setdefault(key, value)  # what moto accepts; this process's S3 clients and mlflow's use them
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        self._spawn("moto_server", [str(binary), "-H", "127.0.0.1", "-p", str(port)], lambda: _http_ok(endpoint))
        return endpoint

    def _mlflow(self) -> str:
        binary = Path(sys.executable).with_name("mlflow")
        if not binary.exists():
            raise SystemExit("mlflow is not installed (pip install -e '.[train]'), or pass --tracking-uri")
        port = _free_port()
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        argv = [str(binary), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        argv += ["--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}"]
        argv += ["--artifacts-destination", "s3://ola-bench/mlflow"]
        self.ensure_bucket("ola-bench")
        uri = f"http://127.0.0.1:{port}"
        self._spawn("mlflow server", argv, lambda: _http_ok(f"{uri}/health"), env)
        return uri

    def ensure_bucket(self, bucket: str) -> None:
        import boto3

        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=region)
        try:
            client.head_bucket(Bucket=bucket)
        except client.exceptions.ClientError:
            client.create_bucket(Bucket=bucket)

    def close(self) -> None:
        for what, proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop; killing it", what)
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()


# ------------------------------------------------------------------------------------------------ serving
class Loop:
    """A background asyncio loop hosting the grpc.aio servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 300.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RoutedBackends:
    """The gateway's backends, chosen per request by its ``model_version``: each version has its own LLM server (as a
    separate replica set would), so one version's servers can fail while the others serve."""

    def __init__(self) -> None:
        self.by_version: dict[str, Any] = {}
        self.default: Any = None

    def add(self, version: str, backends: Any) -> None:
        self.by_version[version] = backends
        self.default = self.default or backends

    def _for(self, req: Any) -> Any:
        return self.by_version.get(getattr(req, "model_version", ""), self.default)

    async def encode_images(self, req: Any, timeout: float | None) -> Any:
        return await self._for(req).encode_images(req, timeout)

    async def encode_video(self, req: Any, timeout: float | None) -> Any:
        return await self._for(req).encode_video(req, timeout)

    async def encode_audio(self, req: Any, timeout: float | None) -> Any:
        return await self._for(req).encode_audio(req, timeout)

    def generate(self, req: Any, timeout: float | None) -> Any:
        return self._for(req).generate(req, timeout)

    def synthesize(self, req: Any, timeout: float | None) -> Any:
        return self._for(req).synthesize(req, timeout)

    async def close(self) -> None:
        for backends in self.by_version.values():
            await backends.close()


class Serving:
    """LLM servers per model version and one omni gateway routing new sessions by the rollout in Redis."""

    def __init__(self, loop: Loop, redis_url: str, model: str, prefix: str, champion: str) -> None:
        from services.gateway import GatewayConfig, OmniGateway, OmniServicer
        from services.gen.ola.omni.v1 import omni_pb2_grpc
        from services.rollout import RolloutRecorder, RolloutRouter

        self.loop = loop
        self.servers: dict[str, tuple[Any, Any]] = {}  # version -> (grpc server, LLM servicer)
        self.backends = RoutedBackends()
        self.router = RolloutRouter(redis_url, model, champion, prefix=prefix)  # production refresh_s (1 s)
        self.recorder = RolloutRecorder(redis_url, prefix=prefix)  # production flush_s (0.25 s)

        async def start() -> tuple[Any, Any, int]:
            gateway = OmniGateway(
                self.backends, GatewayConfig(default_model_version=champion), router=self.router, recorder=self.recorder
            )
            server = grpc_server()
            omni_pb2_grpc.add_OmniServiceServicer_to_server(OmniServicer(gateway), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return gateway, server, port

        self.gateway, self.server, port = loop.run(start())
        self.target = f"127.0.0.1:{port}"

    def add_version(self, version: str, checkpoint: Path) -> None:
        """Serve ``version`` from ``checkpoint`` on its own LLM server, loaded before it is routed to."""
        from services.gateway import GrpcBackends
        from services.llm import LLMServiceConfig, LLMServicer
        from services.llm import add_to_server as add_llm
        from services.registry import ModelRegistry, ModelSource, RegistryConfig

        registry = ModelRegistry(RegistryConfig(versions={version: ModelSource(checkpoint=checkpoint)}))
        llm = LLMServicer(LLMServiceConfig(max_batch=16), registry=registry)

        async def start() -> tuple[Any, int]:
            if not await llm.warmup():
                raise RuntimeError(f"version {version} ({checkpoint}) did not load")
            server = grpc_server()
            add_llm(server, llm)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            address = f"127.0.0.1:{port}"
            return server, GrpcBackends(address, address, address, address)

        server, backends = self.loop.run(start())
        self.servers[version] = (server, llm)
        self.backends.add(version, backends)

    def stop_version(self, version: str) -> None:
        """Stop ``version``'s LLM server: its requests fail from now on (UNAVAILABLE)."""
        server, llm = self.servers.pop(version)

        async def stop() -> None:
            await server.stop(None)
            await llm.close()

        self.loop.run(stop())

    def close(self) -> None:
        for version in list(self.servers):
            self.stop_version(version)

        async def stop() -> None:
            await self.server.stop(None)
            await self.backends.close()

        self.loop.run(stop())
        self.router.close()
        self.recorder.close()


def grpc_server() -> Any:
    import grpc

    return grpc.aio.server()


# ------------------------------------------------------------------------------------------------ traffic
@dataclass
class Sample:
    start: float  # wall clock (time.time), the controller's clock
    end: float
    version: str  # "" when the chat failed before the gateway chose one
    ok: bool
    code: str


class Traffic:
    """Open-loop chats at ``rate`` per second, each a new session (so the router assigns it), from a thread pool."""

    def __init__(self, target: str, rate: float, max_new_tokens: int, workers: int = 16) -> None:
        import grpc

        from services.gen.ola.omni.v1 import omni_pb2_grpc

        self.rate = rate
        self.max_new_tokens = max_new_tokens
        self.channel = grpc.insecure_channel(target)
        self.stub = omni_pb2_grpc.OmniServiceStub(self.channel)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-chat")
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-traffic", daemon=True)
        self.started_at = 0.0
        self.stopped_at = 0.0

    def start(self) -> None:
        self.started_at = time.time()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.pool.shutdown(wait=True)
        self.stopped_at = time.time()
        self.channel.close()

    def since(self, t: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.start >= t]

    def _loop(self) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            self.pool.submit(self._chat, f"bench-{uuid.uuid4().hex[:8]}-{i}")
            i += 1
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _chat(self, session_id: str) -> None:
        import grpc

        from services.gen.ola.common.v1 import sampling_pb2
        from services.gen.ola.omni.v1 import omni_pb2

        sampling = sampling_pb2.SamplingParams(
            temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=self.max_new_tokens
        )
        start, version, ok, code = time.time(), "", False, "OK"
        try:
            for event in self.stub.Chat(omni_pb2.ChatRequest(session_id=session_id, text="Hi.", sampling=sampling)):
                if event.HasField("started"):
                    version = event.started.model_version
                ok = ok or event.HasField("final")
        except grpc.RpcError as exc:
            ok, code = False, exc.code().name
        with self._lock:
            self.samples.append(Sample(start, time.time(), version, ok, code))


# ------------------------------------------------------------------------------------------------ the lifecycle
@dataclass
class Setup:
    args: argparse.Namespace
    servers: Servers
    workdir: Path
    model: str
    prefix: str
    registry: Any  # workflows.lifecycle.registry.ModelRegistry
    store: Any  # the S3 artifact store of the checkpoints
    policy: Any  # PromotionPolicy with the scaled canary plan
    loop: Loop
    serving: Serving
    controller: Any = None
    pipeline_id: str = ""

    def serving_name(self, version: str) -> str:
        return f"{self.model}@{version}"


def _timed(rows: list[dict[str, Any]], phase: str, fn: Any, note: str = "") -> Any:
    start = time.perf_counter()
    out = fn()
    rows.append({"phase": phase, "seconds": time.perf_counter() - start, "note": note})
    return out


def scaled_policy(path: str | None, window_s: float, min_requests: int, latency_ratio: float | None) -> Any:
    """The promotion policy with its canary windows (and, optionally, latency ratios) replaced for a short run."""
    from workflows.lifecycle.policy import load_policy

    policy = load_policy(path)
    thresholds = policy.canary.thresholds
    if latency_ratio is not None:
        thresholds = thresholds.model_copy(
            update={"max_p95_latency_ratio": latency_ratio, "max_ttft_ratio": latency_ratio}
        )
    canary = policy.canary.model_copy(
        update={"window_s": window_s, "min_requests": min_requests, "thresholds": thresholds}
    )
    return policy.model_copy(update={"canary": canary})


def register_and_gate(s: Setup, model_dir: Path, stage: str, metrics: dict[str, float], rows: list) -> str:
    """Register ``model_dir`` as a version, gate it against the champion, nominate it. Returns the version."""
    from workflows.lifecycle.gate import decide
    from workflows.lifecycle.rollout import CHAMPION, RegistryAliasStore, nominate_challenger

    version = _timed(
        rows,
        "register (S3 upload + MLflow version)",
        lambda: s.registry.register_stage_output(
            model_dir, stage=stage, pipeline_id=s.pipeline_id, name=s.model, store=s.store, eval_metrics=metrics
        ),
    )

    def gate() -> Any:
        aliases = RegistryAliasStore(s.registry)
        champion = s.registry.get_version(s.model, aliases.get_alias(s.model, CHAMPION))
        decision = decide(s.registry.get_version(s.model, version).eval_metrics, champion.eval_metrics, s.policy)
        if not decision.passed:
            raise SystemExit(f"version {version}: {decision.summary()}")
        nominate_challenger(aliases, s.model, version, decision)
        return decision

    decision = _timed(rows, "gate + challenger alias", gate)
    rows[-1]["note"] = f"{len(decision.per_metric)} metrics passed"
    return version


def deploy(s: Setup, version: str, rows: list) -> None:
    """Download ``version`` from the registry and serve it on its own LLM server."""

    def fetch_and_serve() -> None:
        path = s.registry.download_version(s.model, version, s.workdir / "serving" / version)
        s.serving.add_version(s.serving_name(version), path)
        for _ in range(WARMUP_CHATS):  # a readiness check: the version answers, its first (slow) calls are done
            _reference_answer(s.serving.target, s.serving_name(version))

    _timed(rows, "deploy (download + load + warm up)", fetch_and_serve)


def wait_state(s: Setup, statuses: tuple[str, ...], timeout: float) -> tuple[Any, float]:
    """Poll the rollout until its status is one of ``statuses``: (the state, the wall-clock time it was seen)."""
    deadline = time.monotonic() + timeout
    while (state := s.controller.state()).status not in statuses:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout {state.id} still {state.status} at step {state.step_index} after {timeout} s")
        time.sleep(0.01)
    return state, time.time()


def time_to_champion(s: Setup, model_dir: Path) -> dict[str, Any]:
    """Phase (i): stage output -> registered -> gated -> deployed -> canary steps -> promoted."""
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    version = register_and_gate(s, model_dir, "candidate", dict(s.args.metrics), rows)
    deploy(s, version, rows)
    state = _timed(rows, "start rollout", lambda: s.controller.start_rollout(version))
    plan = s.policy.canary
    final, seen = wait_state(s, ("promoted", "rolled_back", "aborted"), len(plan.steps) * (plan.window_s * 20 + 60))
    total = time.perf_counter() - t0
    events = final.events
    if final.status != "promoted":
        raise RuntimeError(f"the candidate was not promoted: {final.status}: {events[-1].reasons}")
    audit = {(e["ts"], e["action"]): e for e in s.controller.audit() if e["rollout_id"] == state.id}
    ends = [e for e in events if e.action in ("advance", "promote")]
    starts = [events[0], *[e for e in events if e.action == "advance"]]
    for i, (begin, end) in enumerate(zip(starts, ends, strict=True)):
        stats = audit.get((end.ts, end.action), {}).get("stats", {})
        seconds = end.ts - begin.ts
        note = f"{stats.get('challenger', {}).get('requests', '?')} challenger requests in the window"
        rows.append({"phase": f"canary step {i} ({final.steps[i]:g} %)", "seconds": seconds, "note": note})
    # the last tick: probes, then the champion alias moved in MLflow and the challenger alias deleted
    rows.append({"phase": "probe + promote (aliases moved)", "seconds": seen - events[-2].ts, "note": ""})
    rows.append({"phase": "total: stage output -> champion", "seconds": total, "note": f"version {version}"})
    return {"version": version, "rollout_id": state.id, "phases": rows, "total_s": total}


def rollback_reaction(s: Setup, model_dir: Path, traffic: Traffic) -> dict[str, Any]:
    """Phase (ii): a challenger fails mid-step (its LLM server stops): breach -> rollback -> routed away."""
    rows: list[dict[str, Any]] = []
    version = register_and_gate(s, model_dir, "failing-candidate", dict(s.args.metrics), rows)
    deploy(s, version, rows)
    name = s.serving_name(version)
    state = s.controller.start_rollout(version)
    plan = s.policy.canary
    healthy_needed = min(s.args.healthy_before_breach, plan.min_requests - 1)
    deadline = time.monotonic() + 30 * plan.window_s + 120
    while sum(x.version == name and x.ok for x in traffic.since(state.started_at)) < healthy_needed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} served fewer than {healthy_needed} healthy requests")
        time.sleep(0.02)
    step_before = s.controller.state().step_index
    breach = time.time()
    s.serving.stop_version(name)
    log.info("breach: %s's LLM server stopped", name)
    final, _ = wait_state(s, ("rolled_back", "promoted", "aborted"), 30 * plan.window_s + 120)
    if final.status != "rolled_back":
        raise RuntimeError(f"the failing challenger was not rolled back: {final.status}")
    routed_deadline = time.monotonic() + 30
    while s.serving.router.snapshot.status != "rolled_back" and time.monotonic() < routed_deadline:
        time.sleep(0.01)
    routed = time.time()
    rollback = final.events[-1]
    after = [x for x in traffic.since(breach) if x.version == name]
    reaction = rollback.ts - breach
    return {
        "version": version,
        "rollout_id": state.id,
        "step_index": final.step_index,
        "share": state.steps[final.step_index],
        "step_index_at_breach": step_before,
        "healthy_before_breach": healthy_needed,
        "reaction_s": reaction,
        "routed_away_s": routed - breach,
        "window_s": plan.window_s,
        "reaction_over_window": reaction / plan.window_s,
        "within_window": reaction <= plan.window_s,
        "failed_after_breach": sum(not x.ok for x in after),
        "reasons": rollback.reasons,
        "setup_phases": rows,
    }


# ------------------------------------------------------------------------------------------------ main
def _metrics(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"metrics: {item!r} is not name=number") from None
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"metrics: {item!r} is not name=number")
    return out


def _positive(kind: type, name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name}: must be > 0, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--stage-dir", type=Path, help="a stage output (its checkpoint, or a dir with model/); default: ola init"
    )
    p.add_argument("--policy", help="promotion policy YAML (default: the shipped one)")
    p.add_argument("--window-s", type=_positive(float, "--window-s"), default=5.0, help="each canary step's window")
    p.add_argument("--min-requests", type=_positive(int, "--min-requests"), default=5, help="per window (challenger)")
    p.add_argument("--rate", type=_positive(float, "--rate"), default=20.0, help="chats per second, open loop")
    p.add_argument("--max-new-tokens", type=_positive(int, "--max-new-tokens"), default=4)
    p.add_argument("--tick-s", type=_positive(float, "--tick-s"), default=1.0, help="controller tick interval")
    p.add_argument("--latency-ratio", type=_positive(float, "--latency-ratio"), help="override the p95 ratios")
    p.add_argument("--healthy-before-breach", type=int, default=1, help="challenger successes before its breach")
    p.add_argument("--metrics", type=_metrics, default=CANDIDATE_METRICS, help="candidate eval metrics: a=0.6,b=0.1")
    p.add_argument("--champion-metrics", type=_metrics, default=CHAMPION_METRICS)
    p.add_argument("--redis-url")
    p.add_argument("--s3-endpoint", help="S3 endpoint of a running server (credentials from AWS_* variables)")
    p.add_argument("--bucket", default="ola-bench")
    p.add_argument("--tracking-uri", help="a running MLflow server (its artifacts must reach the same S3)")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary dir, removed)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.healthy_before_breach < 0:
        p.error(f"--healthy-before-breach: must be >= 0, got {args.healthy_before_breach}")
    if args.stage_dir is not None:
        model_dir = args.stage_dir / "model" if (args.stage_dir / "model" / "config.json").is_file() else args.stage_dir
        if not (model_dir / "config.json").is_file():
            p.error(f"--stage-dir: {args.stage_dir} holds no checkpoint (no config.json, nor model/config.json)")
        args.model_dir = model_dir
    return args


def make_stage(workdir: Path) -> tuple[Path, float]:
    """A finished stage's output the cheap way: ``ola init --preset tiny``. Returns (checkpoint dir, seconds)."""
    out = workdir / "stage" / "model"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ola_model.cli", "init", "--preset", "tiny", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both measurements, print the tables, write ``--json``; returns everything measured."""
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ola-bench-lifecycle-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_info(), "config": {}}
    servers = Servers(workdir, args.redis_url, args.s3_endpoint, args.tracking_uri)
    loop = Loop()
    cleanup: list[Any] = []
    try:
        result.update(_run(args, servers, workdir, loop, cleanup))
    finally:
        for close in reversed(cleanup):
            try:
                close()
            except Exception:
                log.exception("cleanup failed")
        loop.close()
        servers.close()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["server_start_s"] = servers.start_s
    print_report(result)
    if args.json:
        write_json(args.json, result)
    return result


def _run(args: argparse.Namespace, servers: Servers, workdir: Path, loop: Loop, cleanup: list) -> dict[str, Any]:
    from services.rollout import OmniProbe
    from workflows.artifacts import S3ArtifactStore
    from workflows.lifecycle.policy import Probe
    from workflows.lifecycle.registry import ModelRegistry
    from workflows.lifecycle.rollout import RegistryAliasStore, RolloutController

    made_s = None
    if getattr(args, "model_dir", None) is None:
        args.model_dir, made_s = make_stage(workdir)
    model = f"bench-{uuid.uuid4().hex[:6]}"
    prefix = f"bench:{model}:rollout:"
    servers.ensure_bucket(args.bucket)
    policy = scaled_policy(args.policy, args.window_s, args.min_requests, args.latency_ratio)
    registry = ModelRegistry(servers.tracking_uri, s3_endpoint_url=servers.s3_endpoint)
    store = S3ArtifactStore(args.bucket, f"bench/{model}", endpoint_url=servers.s3_endpoint)

    # the champion the candidate is rolled out against: an earlier stage output (the same weights), untimed
    champion_dir = workdir / "champion" / "model"
    shutil.copytree(args.model_dir, champion_dir)
    pipeline_id = f"bench-{uuid.uuid4().hex[:8]}"
    champion = registry.register_stage_output(
        champion_dir, stage="champion", pipeline_id=pipeline_id, name=model, store=store,
        eval_metrics=args.champion_metrics,
    )  # fmt: skip
    registry.set_alias(model, "champion", champion)
    serving = Serving(loop, servers.redis_url, model, prefix, f"{model}@{champion}")
    cleanup.append(serving.close)
    serving.add_version(f"{model}@{champion}", registry.download_version(model, champion, workdir / "serving" / "c"))
    s = Setup(args, servers, workdir, model, prefix, registry, store, policy, loop, serving, pipeline_id=pipeline_id)

    # the quality probe: the champion's greedy answer to a fixed prompt (the candidate has the same weights)
    answer = _reference_answer(serving.target, f"{model}@{champion}")
    probe = OmniProbe(
        serving.target, [Probe(id="ref", prompt="Hello.", answers=[answer], match="exact", max_new_tokens=4)]
    )
    s.controller = RolloutController(
        servers.redis_url, model, policy, RegistryAliasStore(registry), probe, prefix=prefix
    )  # fmt: skip
    stop = threading.Event()
    ticker = threading.Thread(
        target=s.controller.run_controller, kwargs={"interval": args.tick_s, "stop": stop}, daemon=True
    )
    ticker.start()
    cleanup.append(lambda: (stop.set(), ticker.join(10)))
    traffic = Traffic(serving.target, args.rate, args.max_new_tokens)
    traffic.start()
    cleanup.append(traffic.stop)

    champion_run = time_to_champion(s, args.model_dir)
    rollback = rollback_reaction(s, args.model_dir, traffic)
    traffic.stop()
    cleanup.remove(traffic.stop)
    seconds = max(traffic.stopped_at - traffic.started_at, 1e-9)
    failed = [x for x in traffic.samples if not x.ok]
    latencies = sorted(x.end - x.start for x in traffic.samples if x.ok)
    return {
        "config": {
            "model": model,
            "stage_dir": str(args.model_dir),
            "ola_init_s": made_s,
            "steps": list(policy.canary.steps),
            "window_s": policy.canary.window_s,
            "min_requests": policy.canary.min_requests,
            "thresholds": policy.canary.thresholds.model_dump(),
            "rate": args.rate,
            "max_new_tokens": args.max_new_tokens,
            "tick_s": args.tick_s,
            "router_refresh_s": serving.router.refresh_s,
            "recorder_flush_s": serving.recorder.flush_s,
        },
        "time_to_champion": champion_run,
        "rollback": rollback,
        "traffic": {
            "chats": len(traffic.samples),
            "achieved_rate": len(traffic.samples) / seconds,
            "failed": len(failed),
            "failed_by_code": {c: sum(x.code == c for x in failed) for c in sorted({x.code for x in failed})},
            "p50_latency_s": latencies[len(latencies) // 2] if latencies else None,
        },
    }


def _reference_answer(target: str, version: str) -> str:
    import grpc

    from services.gen.ola.common.v1 import sampling_pb2
    from services.gen.ola.omni.v1 import omni_pb2, omni_pb2_grpc

    sampling = sampling_pb2.SamplingParams(temperature=0.0, top_k=0, repetition_penalty=1.0, max_new_tokens=4)
    with grpc.insecure_channel(target) as channel:
        stub = omni_pb2_grpc.OmniServiceStub(channel)
        events = list(stub.Chat(omni_pb2.ChatRequest(model_version=version, text="Hello.", sampling=sampling)))
    return events[-1].final.text


def print_report(result: dict[str, Any]) -> None:
    config = result["config"]
    print(
        f"\nsteps {config['steps']} %, window {config['window_s']:g} s, min_requests {config['min_requests']}, "
        f"{config['rate']:g} chats/s, controller tick {config['tick_s']:g} s, router refresh "
        f"{config['router_refresh_s']:g} s, recorder flush {config['recorder_flush_s']:g} s"
    )
    print("\n(i) stage output -> champion")
    print(format_table(result["time_to_champion"]["phases"], [("phase", "phase"), ("seconds", "s"), ("note", "")]))
    rb = result["rollback"]
    rows = [
        {"what": "breach -> rollback (controller)", "seconds": rb["reaction_s"]},
        {"what": "breach -> router routes away", "seconds": rb["routed_away_s"]},
        {"what": "analysis window", "seconds": rb["window_s"]},
    ]
    print(f"\n(ii) rollback reaction: challenger's LLM server stopped in step {rb['step_index_at_breach']}")
    print(format_table(rows, [("what", "what"), ("seconds", "s")]))
    verdict = "met" if rb["within_window"] else "NOT met"
    print(
        f"reaction / window = {rb['reaction_over_window']:.2f} (target <= 1: {verdict}); "
        f"{rb['failed_after_breach']} challenger chats failed after the breach; reason: {rb['reasons'][0]}"
    )
    t = result["traffic"]
    print(f"traffic: {t['chats']} chats at {t['achieved_rate']:.1f}/s, {t['failed']} failed {t['failed_by_code']}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("services", "workflows", "mlflow", "botocore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    main()
