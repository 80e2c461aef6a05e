"""PipelineService over a real gRPC socket with a real Redis: idempotent starts, watching a real training run to its
end, listing, cancelling, an API restart in the middle of a run, and the Ray Jobs backend on a real local cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb
from services.gen.ola.pipeline.v1 import pipeline_pb2_grpc
from workflows.api.jobs import JobStatus, RayJobBackend, group_alive
from workflows.api.runs import InvalidTransition, ManagerConfig, RunManager, RunRecord, RunState, RunStore, new_run_id
from workflows.api.server import ApiServer, ServerConfig
from workflows.training.checkpoints import StagePaths
from workflows.training.smoke_data import write_smoke_dataset

REPO = Path(__file__).resolve().parents[2]
JOB_ENV = {"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "HF_HUB_OFFLINE": "1"}
RUN_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A config directory with a one-stage, three-step recipe, and the smoke dataset it trains on."""
    root = tmp_path_factory.mktemp("pipeline-api")
    (root / "configs").mkdir()
    raw = {
        "name": "mini",
        "model": {"preset": "tiny", "seed": 0},
        "data": {"root": str(root / "data")},
        "defaults": {"batch_size": 2, "lr": 1e-3, "steps": 3, "save_every": 1, "max_length": 2048},
        "stages": [{"name": "v", "trainable": ["mm_projector"], "data": {"caption": 1.0}}],
    }
    (root / "configs" / "mini.yaml").write_text(yaml.safe_dump(raw))
    write_smoke_dataset(root / "data")
    return root


def _config(workspace: Path, redis_url: str, prefix: str, **overrides: Any) -> ServerConfig:
    base = {
        "redis_url": redis_url,
        "runs_root": workspace / "runs",
        "port": 0,
        "prefix": prefix,
        "config_dirs": [workspace / "configs"],
        "job_env": JOB_ENV,
        "job_cwd": str(REPO),
        "poll_interval_s": 0.2,
    }
    return ServerConfig(**{**base, **overrides})


class Client:
    """A PipelineService stub bound to a target and an API key."""

    def __init__(self, target: str, key: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pipeline_pb2_grpc.PipelineServiceStub(self.channel)
        self.md = [("x-api-key", key)]

    def __getattr__(self, name: str):
        method = getattr(self.stub, name)
        return lambda request, **kw: method(request, metadata=self.md, timeout=kw.pop("timeout", 30), **kw)

    def wait_for(self, run_id: str, predicate, timeout: float = RUN_TIMEOUT_S) -> pb.Run:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.GetRun(pb.GetRunRequest(run_id=run_id)).run
            if predicate(run):
                return run
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} did not get there in {timeout} s; it is {pb.RunState.Name(run.state)}")

    def close(self) -> None:
        self.channel.close()


def _cli(argv: list[str]) -> int:
    import argparse

    from workflows.api.cli import add_pipeline_client_commands

    parser = argparse.ArgumentParser(prog="ola")
    pipeline = parser.add_subparsers(dest="command", required=True).add_parser("pipeline")
    add_pipeline_client_commands(pipeline.add_subparsers(dest="pipeline_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _start(loop, config: ServerConfig) -> tuple[ApiServer, str]:
    server = ApiServer(config)
    port = loop.run(server.start())
    return server, f"127.0.0.1:{port}"


def _status(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def _kinds(events: list[pb.WatchRunResponse]) -> list[str]:
    out = []
    for e in events:
        kind = e.WhichOneof("event")
        if kind == "state_changed":
            out.append(f"state:{pb.RunState.Name(e.state_changed.to_state).removeprefix('RUN_STATE_')}")
        elif kind in ("stage_started", "stage_finished"):
            out.append(f"{kind}:{getattr(e, kind).stage}")
        elif kind == "run_finished":
            out.append(f"finished:{pb.RunState.Name(e.run_finished.state).removeprefix('RUN_STATE_')}")
    return out


# ------------------------------------------------------------------------------------- a real run, end to end
def test_idempotent_start_watch_to_the_end_across_an_api_restart(loop, workspace, redis_url) -> None:
    prefix = f"test-runs-{uuid.uuid4().hex[:8]}:"
    config = _config(workspace, redis_url, prefix)
    first, target = _start(loop, config)
    _, key = loop.run(first.keys.create("ci", "trigger"))
    client = Client(target, key)
    try:
        request = pb.StartRunRequest(config="mini", data_root=str(workspace / "data"), idempotency_key="nightly-1")
        a = client.StartRun(request)
        b = client.StartRun(request)
        assert a.created and not b.created
        assert a.run.run_id == b.run.run_id and a.run.stages == ["v"] and a.run.config_name == "mini"
        assert a.run.backend == "local" and a.run.created_by == "ci"
        code, details = _status(
            lambda: client.StartRun(pb.StartRunRequest(config="mini", stages=["v"], idempotency_key="nightly-1"))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("idempotency_key: 'nightly-1'")
        listed = client.ListRuns(pb.ListRunsRequest()).runs
        assert [r.run_id for r in listed] == [a.run.run_id]  # one run, never a second

        run_id = a.run.run_id
        running = client.wait_for(run_id, lambda r: r.state == pb.RUN_STATE_RUNNING)
        assert running.job_id == run_id
        loop.run(first.stop(0))  # the API goes away mid-run; the job does not
        client.close()

        second, target = _start(loop, config)  # a new server on the same Redis re-attaches to the run
        client = Client(target, key)
        try:
            events = list(client.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=RUN_TIMEOUT_S))
            kinds = _kinds(events)
            assert kinds[:2] == ["state:PENDING", "state:RUNNING"]
            assert kinds[-2:] == ["state:SUCCEEDED", "finished:SUCCEEDED"]
            assert kinds.index("stage_started:v") < kinds.index("stage_finished:v") < kinds.index("state:SUCCEEDED")
            ids = [e.event_id for e in events]
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)

            done = StagePaths(Path(running.output_dir), "v").read_done()
            finished = next(e.stage_finished for e in events if e.WhichOneof("event") == "stage_finished")
            assert finished.steps == done["steps"] == 3 and finished.final_loss == pytest.approx(done["final_loss"])
            for e in events:
                if e.WhichOneof("event") == "step_progress":
                    assert 1 <= e.step_progress.step <= 3 and e.step_progress.total_steps == 3

            resumed = list(client.WatchRun(pb.WatchRunRequest(run_id=run_id, after_event_id=ids[1]), timeout=30))
            assert [e.event_id for e in resumed] == ids[2:]

            run = client.GetRun(pb.GetRunRequest(run_id=run_id)).run
            assert run.state == pb.RUN_STATE_SUCCEEDED and run.HasField("end_time") and run.message == ""
            (stage,) = run.stage_progress
            assert (stage.name, stage.state, stage.step, stage.total_steps) == ("v", pb.STAGE_STATE_DONE, 3, 3)
            assert stage.loss == pytest.approx(done["final_loss"])
            assert Path(run.output_dir, "stages", "v", "model").is_dir()

            ok = client.ListRuns(pb.ListRunsRequest(states=[pb.RUN_STATE_SUCCEEDED])).runs
            assert run_id in [r.run_id for r in ok]
            assert client.ListRuns(pb.ListRunsRequest(states=[pb.RUN_STATE_RUNNING])).runs == []
            code, details = _status(lambda: client.CancelRun(pb.CancelRunRequest(run_id=run_id)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "already finished (SUCCEEDED)" in details
            again = client.StartRun(request)  # the key still names the finished run
            assert not again.created and again.run.run_id == run_id
        finally:
            client.close()
            loop.run(second.stop(0))
    finally:
        client.close()


def test_cancel_stops_the_job(loop, workspace, redis_url) -> None:
    prefix = f"test-cancel-{uuid.uuid4().hex[:8]}:"
    server, target = _start(loop, _config(workspace, redis_url, prefix))
    _, key = loop.run(server.keys.create("ops", "trigger"))
    client = Client(target, key)
    try:
        run = client.StartRun(pb.StartRunRequest(config="mini", data_root=str(workspace / "data"))).run
        client.wait_for(run.run_id, lambda r: r.job_id != "")
        cancelling = client.CancelRun(pb.CancelRunRequest(run_id=run.run_id)).run
        assert cancelling.state in (pb.RUN_STATE_CANCELLING, pb.RUN_STATE_CANCELLED)
        events = list(client.WatchRun(pb.WatchRunRequest(run_id=run.run_id), timeout=60))
        assert _kinds(events)[-2:] == ["state:CANCELLED", "finished:CANCELLED"]
        assert events[-1].run_finished.message == "cancelled by request"
        status = loop.run(server.manager.backend.status(run.run_id))
        assert status.status == JobStatus.STOPPED
        pid = json.loads((workspace / "runs" / ".jobs" / run.run_id / "job.json").read_text())["pid"]
        assert not group_alive(pid)  # the whole process group is gone, not only its leader
        same = client.CancelRun(pb.CancelRunRequest(run_id=run.run_id)).run
        assert same.state == pb.RUN_STATE_CANCELLED
        assert not StagePaths(Path(run.output_dir), "v").is_done()
    finally:
        client.close()
        loop.run(server.stop(0))


# ------------------------------------------------------------------------- finished stages land in the registry
def _tracked_config(workspace: Path, name: str, model_name: str, stages: list[dict[str, Any]]) -> str:
    """Write a recipe that registers its finished stages as versions of ``model_name``; returns the config name."""
    raw = {
        "name": name,
        "model": {"preset": "tiny", "seed": 0},
        "data": {"root": str(workspace / "data")},
        "defaults": {"batch_size": 2, "lr": 1e-3, "steps": 3, "save_every": 1, "max_length": 2048},
        "stages": stages,
        "registry": {"model_name": model_name},
    }
    (workspace / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return name


def _pipeline_id(output_dir: str) -> str:
    """The pipeline run's id, kept by the job in ``OUT/pipeline.json`` (the registered versions carry it as a tag)."""
    return json.loads(Path(output_dir, "pipeline.json").read_text())["pipeline_id"]


def _assert_complete(registry: Any, model_name: str, pipeline_id: str, tmp: Path) -> list[str]:
    """Every version the run registered is READY and downloads as a whole, verified checkpoint; returns its stages."""
    stages = []
    for info in registry.list_versions(model_name):
        if info.tags.get("pipeline_id") != pipeline_id:
            continue
        assert info.status == "READY", f"version {info.version} is {info.status}"
        out = registry.download_version(model_name, info.version, tmp / f"v{info.version}")
        assert (out / "config.json").is_file()
        stages.append(info.stage)
    return stages


def test_a_finished_run_registers_its_stages_and_a_cancelled_stage_registers_nothing(
    loop, workspace, redis_url, mlflow_server, tmp_path
) -> None:
    from workflows.lifecycle.registry import ModelRegistry

    model_name = f"api-reg-{uuid.uuid4().hex[:8]}"
    v = {"name": "v", "trainable": ["mm_projector"], "data": {"caption": 1.0}}
    w = {"name": "w", "trainable": ["mm_projector"], "data": {"caption": 1.0}, "steps": 100000, "save_every": 1000}
    done_cfg = _tracked_config(workspace, "reg-done", model_name, [v])
    cut_cfg = _tracked_config(workspace, "reg-cut", model_name, [v, w])
    job_env = {**JOB_ENV, "MLFLOW_TRACKING_URI": mlflow_server}
    prefix = f"test-reg-{uuid.uuid4().hex[:8]}:"
    server, target = _start(loop, _config(workspace, redis_url, prefix, job_env=job_env))
    _, key = loop.run(server.keys.create("ci", "trigger"))
    client = Client(target, key)
    registry = ModelRegistry(mlflow_server)
    try:
        data = str(workspace / "data")
        done = client.StartRun(pb.StartRunRequest(config=done_cfg, data_root=data)).run
        cut = client.StartRun(pb.StartRunRequest(config=cut_cfg, data_root=data)).run

        events = list(client.WatchRun(pb.WatchRunRequest(run_id=done.run_id), timeout=RUN_TIMEOUT_S))
        assert _kinds(events)[-2:] == ["state:SUCCEEDED", "finished:SUCCEEDED"]
        done_id = _pipeline_id(done.output_dir)
        version = registry.find_version(model_name, pipeline_id=done_id, stage="v")
        assert version is not None and version.stage == "v" and version.tags["config_name"] == done_cfg
        assert _assert_complete(registry, model_name, done_id, tmp_path) == ["v"]

        # cancel the second run while its long stage w trains: v stays registered, w never appears
        client.wait_for(
            cut.run_id, lambda r: any(s.name == "w" and s.step >= 1 for s in r.stage_progress), timeout=RUN_TIMEOUT_S
        )
        client.CancelRun(pb.CancelRunRequest(run_id=cut.run_id))
        last = list(client.WatchRun(pb.WatchRunRequest(run_id=cut.run_id), timeout=60))[-1]
        assert last.run_finished.state == pb.RUN_STATE_CANCELLED
        cut_id = _pipeline_id(cut.output_dir)
        assert registry.find_version(model_name, pipeline_id=cut_id, stage="v") is not None
        assert registry.find_version(model_name, pipeline_id=cut_id, stage="w") is None
        assert _assert_complete(registry, model_name, cut_id, tmp_path) == ["v"]
        assert not StagePaths(Path(cut.output_dir), "w").is_done()
    finally:
        client.close()
        loop.run(server.stop(0))


# ------------------------------------------------------------------------------------------ fast, no training
def _record(run_id: str, state: RunState, key: str = "") -> RunRecord:
    return RunRecord(
        run_id=run_id,
        config="mini",
        config_path="/x/mini.yaml",
        config_name="mini",
        stages=["v"],
        requested_stages=[],
        data_root="",
        idempotency_key=key,
        output_dir=f"/x/{run_id}",
        backend="local",
        created_by="t",
        fingerprint="f",
        state=state,
    )


def test_listing_pages_filters_bad_requests_and_the_cli(loop, workspace, redis_url, capsys) -> None:
    prefix = f"test-list-{uuid.uuid4().hex[:8]}:"
    server, target = _start(loop, _config(workspace, redis_url, prefix))
    _, key = loop.run(server.keys.create("reader", "trigger"))
    client = Client(target, key)
    try:
        states = [RunState.SUCCEEDED, RunState.FAILED, RunState.SUCCEEDED, RunState.CANCELLED] * 2
        ids = [new_run_id(1_700_000_000 + i) for i in range(len(states))]
        for run_id, state in zip(ids, states, strict=True):
            loop.run(server.store.create(_record(run_id, state)))
        seen, token = [], ""
        while True:
            page = client.ListRuns(pb.ListRunsRequest(page_size=3, page_token=token))
            assert len(page.runs) <= 3
            seen += [r.run_id for r in page.runs]
            token = page.next_page_token
            if not token:
                break
        assert seen == ids[::-1]  # newest first, every run once
        ok = client.ListRuns(pb.ListRunsRequest(page_size=2, states=[pb.RUN_STATE_SUCCEEDED]))
        assert [r.run_id for r in ok.runs] == [ids[6], ids[4]] and ok.next_page_token
        rest = client.ListRuns(
            pb.ListRunsRequest(page_size=2, states=[pb.RUN_STATE_SUCCEEDED], page_token=ok.next_page_token)
        )
        assert [r.run_id for r in rest.runs] == [ids[2], ids[0]]

        bad = [
            (pb.ListRunsRequest(page_token="garbage"), "page_token: "),
            (pb.ListRunsRequest(page_size=1001), "page_size: must be 0 to 1000 (got 1001)"),
            (pb.ListRunsRequest(states=[pb.RUN_STATE_UNSPECIFIED]), "states[0]: "),
        ]
        for request, message in bad:
            code, details = _status(lambda request=request: client.ListRuns(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(message)
        for request, message in [
            (pb.StartRunRequest(config="mini", stages=["zz"]), "stages: unknown stage(s) ['zz']"),
            (pb.StartRunRequest(config="/etc/passwd"), "config: no training config '/etc/passwd'"),
            (pb.StartRunRequest(config="../configs/mini.yaml/.."), "config: no training config"),
            (pb.StartRunRequest(config=""), "config: is required"),
            (pb.StartRunRequest(config="mini", idempotency_key="a b"), "idempotency_key: must be 1 to 128"),
        ]:
            code, details = _status(lambda request=request: client.StartRun(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(message), details
        code, _ = _status(lambda: client.GetRun(pb.GetRunRequest(run_id=new_run_id())))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = _status(lambda: list(client.WatchRun(pb.WatchRunRequest(run_id="run-nope"))))
        assert code == grpc.StatusCode.NOT_FOUND
        # a finished run's history replays and the stream ends
        events = list(client.WatchRun(pb.WatchRunRequest(run_id=ids[0])))
        assert _kinds(events) == ["state:SUCCEEDED"]
    finally:
        client.close()

    # the same through `ola pipeline get|list|watch|cancel|start`
    try:
        common = ["--target", target, "--api-key", key]
        assert _cli(["pipeline", "get", ids[1], *common]) == 0
        assert capsys.readouterr().out.startswith(f"{ids[1]}  FAILED")
        assert _cli(["pipeline", "list", "--state", "cancelled", "--json", *common]) == 0
        listed = json.loads(capsys.readouterr().out)["runs"]
        assert [r["run_id"] for r in listed] == [ids[7], ids[3]] and listed[0]["state"] == "RUN_STATE_CANCELLED"
        assert _cli(["pipeline", "watch", ids[0], *common]) == 0  # SUCCEEDED
        assert capsys.readouterr().out.endswith("  state SUCCEEDED\n")
        assert _cli(["pipeline", "watch", ids[1], *common]) == 1  # FAILED
        capsys.readouterr()
        assert _cli(["pipeline", "cancel", ids[0], *common]) == 2
        assert "FAILED_PRECONDITION" in capsys.readouterr().err
        assert _cli(["pipeline", "start", "--config", "nope", *common]) == 2
        assert "INVALID_ARGUMENT: config: no training config 'nope'" in capsys.readouterr().err
        assert _cli(["pipeline", "list", "--state", "sleeping", *common]) == 2
        assert _cli(["pipeline", "list", "--api-key", "ola_0123456789ab_x", "--target", target]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        loop.run(server.stop(0))


def test_store_claims_an_idempotency_key_once_and_guards_transitions(loop, redis_url) -> None:
    import redis.asyncio as aioredis

    store = RunStore(loop.run(_aclient(redis_url)), prefix=f"test-store-{uuid.uuid4().hex[:8]}:")

    async def race() -> list[tuple[RunRecord, bool]]:
        records = [_record(new_run_id(), RunState.PENDING, key="same-key") for _ in range(8)]
        return await asyncio.gather(*(store.create(r) for r in records))

    results = loop.run(race())
    assert sum(created for _, created in results) == 1
    assert len({r.run_id for r, _ in results}) == 1
    run_id = results[0][0].run_id
    assert loop.run(store.active_ids()) == [run_id]

    def finish(r: RunRecord) -> list:
        r.state = RunState.FAILED
        r.message = "boom"
        return []

    done = loop.run(store.update(run_id, finish))
    assert done.state == RunState.FAILED and done.end_time is not None
    assert loop.run(store.active_ids()) == []
    with pytest.raises(InvalidTransition, match="cannot go from FAILED to RUNNING"):
        loop.run(store.update(run_id, lambda r: (setattr(r, "state", RunState.RUNNING), [])[1]))
    events = loop.run(store.events(run_id))
    assert [(e.type, e.state) for e in events] == [
        ("state_changed", RunState.PENDING),
        ("state_changed", RunState.FAILED),
        ("run_finished", RunState.FAILED),
    ]
    assert events[-1].data == {"state": "FAILED", "message": "boom"}
    assert isinstance(store.redis, aioredis.Redis)


async def _aclient(url: str):
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url)


def test_unreachable_job_backend_is_retried_then_fails_the_run(loop, workspace, redis_url) -> None:
    store = RunStore(loop.run(_aclient(redis_url)), prefix=f"test-unreach-{uuid.uuid4().hex[:8]}:")
    backend = RayJobBackend(f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    manager = RunManager(
        store,
        backend,
        ManagerConfig(
            runs_root=workspace / "runs",
            config_dirs=[workspace / "configs"],
            poll_interval_s=0.1,
            submit_timeout_s=1.0,
        ),
    )
    try:
        record, created = loop.run(manager.start_run("mini.yaml"))
        assert created and record.state == RunState.PENDING and record.backend == "ray"
        deadline = time.monotonic() + 30
        while (current := loop.run(store.get(record.run_id))).state == RunState.PENDING:
            assert time.monotonic() < deadline, current
            time.sleep(0.1)
        assert current.state == RunState.FAILED and current.job_id == ""
        assert current.message.startswith("job submission failed (") and current.submit_attempts >= 2
    finally:
        loop.run(manager.close())


# ------------------------------------------------------------------------------------------------- Ray Jobs
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A local Ray head with the dashboard (Ray Jobs needs it), started for this module and stopped after it."""
    ray = shutil.which("ray") or str(Path(os.sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    dash, gcs = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **JOB_ENV}
    env["PATH"] = f"{Path(os.sys.executable).parent}:{env.get('PATH', '')}"
    cmd = [ray, "start", "--head", "--block", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    cmd += [f"--dashboard-port={dash}", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={temp}"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray dashboard did not come up in 90 s")
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the head and every process it started (its own session)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # ray start --block leaves the GCS behind on SIGTERM
        proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # a Ray head with its dashboard (~10 s) and a training job: minutes on a loaded 2-core machine
def test_ray_job_backend_submits_reports_stops_and_reattaches(loop, ray_cluster, tmp_path) -> None:
    backend = RayJobBackend(ray_cluster, cwd=str(tmp_path))
    job = f"job-{uuid.uuid4().hex[:8]}"
    cmd = ["python", "-c", "import os; print('hello from', os.getcwd(), os.environ['OLA_TEST'])"]
    assert loop.run(backend.submit(job, cmd, {"OLA_TEST": "env-ok"})) == job
    assert loop.run(backend.submit(job, ["false"], {})) == job  # the same id again: the first job, not a second
    deadline = time.monotonic() + 120
    while not (info := loop.run(backend.status(job))).status.terminal:
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    assert info.status == JobStatus.SUCCEEDED
    assert f"hello from {tmp_path} env-ok" in loop.run(backend.logs_tail(job))

    sleeper = f"job-{uuid.uuid4().hex[:8]}"
    loop.run(backend.submit(sleeper, ["sleep", "600"], {}))
    while loop.run(backend.status(sleeper)).status != JobStatus.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    loop.run(backend.stop(sleeper))
    while not (info := loop.run(backend.status(sleeper))).status.terminal:
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    assert info.status == JobStatus.STOPPED
    assert loop.run(backend.status("job-never-submitted")).status == JobStatus.LOST


@pytest.mark.slow
def test_ray_jobs_backend_runs_a_real_pipeline(loop, workspace, redis_url, ray_cluster) -> None:
    prefix = f"test-ray-{uuid.uuid4().hex[:8]}:"
    config = _config(workspace, redis_url, prefix, ray_address=ray_cluster, runs_root=workspace / "ray-runs")
    server, target = _start(loop, config)
    _, key = loop.run(server.keys.create("ci", "trigger"))
    client = Client(target, key)
    try:
        started = client.StartRun(pb.StartRunRequest(config="mini", data_root=str(workspace / "data"))).run
        assert started.backend == "ray"
        from ray.job_submission import JobSubmissionClient

        ray_jobs = JobSubmissionClient(ray_cluster)
        try:
            events = list(client.WatchRun(pb.WatchRunRequest(run_id=started.run_id), timeout=RUN_TIMEOUT_S))
        except grpc.RpcError:
            ray_jobs.stop_job(started.run_id)  # never leave a job behind (a killed build would leave its lock)
            pytest.fail(f"the run did not finish; job log:\n{ray_jobs.get_job_logs(started.run_id)[-3000:]}")
        run = client.GetRun(pb.GetRunRequest(run_id=started.run_id)).run
        assert _kinds(events)[-1] == "finished:SUCCEEDED", (_kinds(events), run.message)
        assert run.job_id == started.run_id and run.stage_progress[0].state == pb.STAGE_STATE_DONE
        assert str(ray_jobs.get_job_status(run.job_id).value) == "SUCCEEDED"
        assert "stage v: done" in ray_jobs.get_job_logs(run.job_id)
        assert StagePaths(Path(run.output_dir), "v").is_done()
        # submitting the same run again (an API server retrying after a crash) re-attaches, never a second job
        assert loop.run(server.manager.backend.submit(run.job_id, ["false"], {})) == run.job_id
        assert len([j for j in ray_jobs.list_jobs() if j.submission_id == run.job_id]) == 1
    finally:
        client.close()
        loop.run(server.stop(0))
