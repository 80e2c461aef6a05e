"""Training runs: the durable run store in Redis, and the manager that submits runs as jobs and keeps them in step.

Redis layout (``prefix`` defaults to ``ola:api:``)::

    <prefix>run:<run id>           JSON of the RunRecord
    <prefix>run:<run id>:events    a stream of the run's events (state changes, stage progress, the final event)
    <prefix>run:<run id>:lease     which API server's monitor follows the run (expires unless renewed)
    <prefix>runs                   sorted set of every run id (all scores 0: ordered by id, which is by time)
    <prefix>runs:active            set of the ids of runs not yet terminal
    <prefix>idem:<key>             run id started with an idempotency key

A record and its events change together in one MULTI/EXEC under WATCH, so a reader never sees a state without its
event or the other way round, and two writers never lose each other's update. The idempotency key is claimed in the
same transaction that writes the run, so one key can only ever name one run.

Lifecycle: ``PENDING`` (recorded; the manager submits the job, retrying until ``submit_timeout_s``) -> ``RUNNING``
(the job runs) -> ``SUCCEEDED`` | ``FAILED``; CancelRun moves an active run to ``CANCELLING`` and stops its job,
which ends it ``CANCELLED``. Terminal states are final. Progress comes from the run's output directory
(:mod:`workflows.api.progress`). After an API restart :meth:`RunManager.start` reads the active runs back and
re-attaches a monitor to each (the job id is the run id, on both backends).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from workflows.api.errors import FailedPrecondition, InvalidArgument, NotFound
from workflows.api.jobs import JobBackend, JobInfo, JobStatus, default_pipeline_command
from workflows.api.progress import StageProgress, progress_events, read_progress

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^run-\d{8}-\d{6}-\d{3}-[0-9a-f]{6}$")
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
EVENTS_MAXLEN = 10_000


class RunState(enum.StrEnum):
    """A run's state (the proto's RunState without the RUN_STATE_ prefix)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


# Allowed transitions; terminal states have none.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset(
        {RunState.RUNNING, RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLING, RunState.CANCELLED}
    ),
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLING}),
    RunState.CANCELLING: frozenset({RunState.CANCELLED, RunState.SUCCEEDED, RunState.FAILED}),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
}


class InvalidTransition(FailedPrecondition):
    """A state change the lifecycle does not allow."""


@dataclass
class RunRecord:
    """What the store keeps about a run (times are Unix seconds)."""

    run_id: str
    config: str  # as the request named it
    config_path: str  # the resolved YAML
    config_name: str
    stages: list[str]  # resolved: every stage the run trains
    requested_stages: list[str]  # as requested (empty: all)
    data_root: str
    idempotency_key: str
    output_dir: str
    backend: str
    created_by: str
    fingerprint: str  # of the request's parameters (an idempotency key reused with others is refused)
    state: RunState = RunState.PENDING
    job_id: str = ""
    message: str = ""
    cancel_requested: bool = False
    submit_attempts: int = 0
    create_time: float = field(default_factory=time.time)
    update_time: float = field(default_factory=time.time)
    end_time: float | None = None
    progress: list[StageProgress] = field(default_factory=list)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunRecord:
        data = json.loads(text)
        data["state"] = RunState(data["state"])
        data["progress"] = [StageProgress.from_dict(p) for p in data.get("progress", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RunEvent:
    """One entry of a run's event stream: ``type`` is state_changed, stage_started, step_progress, stage_finished
    or run_finished; ``state`` the run's state when it was recorded."""

    event_id: str
    type: str
    data: dict[str, Any]
    state: RunState
    time: float


def new_run_id(now: float | None = None) -> str:
    """``run-YYYYmmdd-HHMMSS-mmm-<6 hex>``: sorts by creation time (UTC), unique by its random tail."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"run-{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


def _b(text: Any) -> str:
    return text.decode() if isinstance(text, bytes) else text


class RunStore:
    """Run records and their events in Redis (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "ola:api:") -> None:
        self.redis = client
        self.prefix = prefix

    def _run(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def _events(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:events"

    def _lease(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:lease"

    def _idem(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}runs"

    @property
    def _active(self) -> str:
        return f"{self.prefix}runs:active"

    @staticmethod
    def _queue_events(pipe: Any, key: str, record: RunRecord, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        for kind, data in events:
            fields = {"type": kind, "data": json.dumps(data), "state": record.state.value, "time": repr(time.time())}
            pipe.xadd(key, fields, maxlen=EVENTS_MAXLEN, approximate=True)

    async def create(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Record a new run, or return the run its idempotency key already names. Returns (run, created).

        Raises:
            FailedPrecondition: the idempotency key names a run started with other parameters.
        """
        idem = self._idem(record.idempotency_key) if record.idempotency_key else None
        event = ("state_changed", {"from_state": "", "to_state": record.state.value, "message": ""})
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if idem is not None:
                        await pipe.watch(idem)
                        existing = await pipe.get(idem)
                        if existing is not None:
                            await pipe.reset()
                            earlier = await self.get(_b(existing))
                            if earlier.fingerprint != record.fingerprint:
                                raise FailedPrecondition(
                                    f"{record.idempotency_key!r} already started run {earlier.run_id} with other "
                                    "parameters (config, stages or data_root); use a new key",
                                    field="idempotency_key",
                                )
                            return earlier, False
                    pipe.multi()
                    if idem is not None:
                        pipe.set(idem, record.run_id)
                    pipe.set(self._run(record.run_id), record.to_json())
                    pipe.zadd(self._index, {record.run_id: 0})
                    pipe.sadd(self._active, record.run_id)
                    self._queue_events(pipe, self._events(record.run_id), record, [event])
                    await pipe.execute()
                    return record, True
                except redis.exceptions.WatchError:
                    continue  # another StartRun claimed the key meanwhile: read its run

    async def get(self, run_id: str) -> RunRecord:
        """The run's record. NotFound for an unknown or malformed id."""
        raw = await self.redis.get(self._run(run_id)) if _RUN_ID.match(run_id or "") else None
        if raw is None:
            raise NotFound(f"no run {run_id!r}", field="run_id")
        return RunRecord.from_json(raw)

    async def update(
        self, run_id: str, change: Callable[[RunRecord], list[tuple[str, dict[str, Any]]] | None]
    ) -> RunRecord:
        """Apply ``change`` to the run's record atomically (retried if another writer got there first).

        ``change`` edits the record in place and returns the events to append, or None to leave the record as it
        was. A state change is checked against :data:`TRANSITIONS` and gets its ``state_changed`` event (and a
        ``run_finished`` one when terminal) without ``change`` having to add them.
        """
        key = self._run(run_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise NotFound(f"no run {run_id!r}", field="run_id")
                    before = RunRecord.from_json(raw)
                    record = RunRecord.from_json(raw)
                    events = change(record)
                    if events is None:
                        await pipe.reset()
                        return before
                    events = list(events)
                    if record.state != before.state:
                        if record.state not in TRANSITIONS[before.state]:
                            raise InvalidTransition(
                                f"run {run_id} cannot go from {before.state.value} to {record.state.value}"
                            )
                        events.append(
                            (
                                "state_changed",
                                {
                                    "from_state": before.state.value,
                                    "to_state": record.state.value,
                                    "message": record.message,
                                },
                            )
                        )
                        if record.state.terminal:
                            record.end_time = time.time()
                            events.append(("run_finished", {"state": record.state.value, "message": record.message}))
                    record.update_time = time.time()
                    pipe.multi()
                    pipe.set(key, record.to_json())
                    if record.state.terminal:
                        pipe.srem(self._active, run_id)
                    self._queue_events(pipe, self._events(run_id), record, events)
                    await pipe.execute()
                    return record
                except redis.exceptions.WatchError:
                    continue
                except BaseException:
                    await pipe.reset()
                    raise

    async def list(
        self, *, page_size: int = 0, page_token: str = "", states: Sequence[RunState] = ()
    ) -> tuple[list[RunRecord], str]:
        """A page of runs, newest first, optionally only in ``states``. Returns (runs, next page token or '')."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"must be 0 to {MAX_PAGE_SIZE} (got {page_size})", field="page_size")
        size = page_size or DEFAULT_PAGE_SIZE
        after = _decode_token(page_token)
        wanted = set(states)
        runs: list[RunRecord] = []
        upper = f"({after}" if after else "+"
        while len(runs) < size:
            ids = [_b(i) for i in await self.redis.zrevrangebylex(self._index, upper, "-", start=0, num=size)]
            if not ids:
                return runs, ""
            raws = await self.redis.mget([self._run(i) for i in ids])
            for run_id, raw in zip(ids, raws, strict=True):
                upper = f"({run_id}"
                if raw is None:
                    continue
                record = RunRecord.from_json(raw)
                if not wanted or record.state in wanted:
                    runs.append(record)
                    if len(runs) == size:
                        break
        last = runs[-1].run_id
        more = await self.redis.zrevrangebylex(self._index, f"({last}", "-", start=0, num=1)
        return runs, _encode_token(last) if more else ""

    async def events(self, run_id: str, after: str = "", *, block_ms: int = 0, count: int = 100) -> list[RunEvent]:
        """Events after ``after`` (an event id; '' from the start), waiting up to ``block_ms`` for one to come."""
        start = after or "0-0"
        if block_ms > 0:
            reply = await self.redis.xread({self._events(run_id): start}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = await self.redis.xrange(self._events(run_id), min=f"({start}", count=count)
        out = []
        for event_id, fields in entries:
            f = {_b(k): _b(v) for k, v in fields.items()}
            out.append(RunEvent(_b(event_id), f["type"], json.loads(f["data"]), RunState(f["state"]), float(f["time"])))
        return out

    async def active_ids(self) -> list[str]:
        """Ids of the runs not yet terminal."""
        return sorted(_b(i) for i in await self.redis.smembers(self._active))

    async def acquire_lease(self, run_id: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew the run's monitor lease for ``owner``; False while another owner holds it."""
        key = self._lease(run_id)
        if await self.redis.set(key, owner, nx=True, px=ttl_ms):
            return True
        current = await self.redis.get(key)
        if current is not None and _b(current) == owner:
            await self.redis.pexpire(key, ttl_ms)
            return True
        return False

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up (only if ``owner`` holds it), so another server takes the run over at once."""
        key = self._lease(run_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if _b(await pipe.get(key) or b"") == owner:
                    pipe.multi()
                    pipe.delete(key)
                    await pipe.execute()
            except redis.exceptions.WatchError:
                pass


def _encode_token(run_id: str) -> str:
    return base64.urlsafe_b64encode(run_id.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        run_id = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except ValueError:
        run_id = ""
    if not _RUN_ID.match(run_id):
        raise InvalidArgument("is not a token from a ListRuns response", field="page_token")
    return run_id


# ------------------------------------------------------------------------------------------------- the manager
@dataclass
class ManagerConfig:
    """How runs are made and followed.

    Attributes:
        runs_root: each run writes to ``runs_root/<run id>`` (on a cluster: a volume the jobs and the API share).
        config_dirs: directories training configs may come from (a name ``tiny`` is ``<dir>/tiny.yaml``).
        pipeline_command: the command a job runs, before its ``--config ... --out ...`` arguments.
        job_env: environment variables of every job.
        poll_interval_s: how often a monitor reads its job's status and progress.
        submit_timeout_s: how long a run may stay unsubmitted (backend unreachable) before it fails.
    """

    runs_root: Path
    config_dirs: list[Path]
    pipeline_command: list[str] = field(default_factory=default_pipeline_command)
    job_env: dict[str, str] = field(default_factory=dict)
    poll_interval_s: float = 1.0
    submit_timeout_s: float = 300.0


class RunManager:
    """Starts runs, submits them to a :class:`JobBackend`, and runs one monitor task per active run."""

    def __init__(self, store: RunStore, backend: JobBackend, config: ManagerConfig) -> None:
        self.store = store
        self.backend = backend
        self.config = config
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self._monitors: dict[str, asyncio.Task] = {}
        self._closed = False

    @property
    def lease_ms(self) -> int:
        return int(max(5.0, 5 * self.config.poll_interval_s) * 1000)

    async def start(self) -> list[str]:
        """Re-attach a monitor to every active run (after a restart). Returns their ids."""
        ids = await self.store.active_ids()
        for run_id in ids:
            self._ensure_monitor(run_id)
        if ids:
            log.info("re-attached %d active run(s): %s", len(ids), ", ".join(ids))
        return ids

    async def close(self) -> None:
        """Stop following runs (their jobs keep running) and give up their leases."""
        self._closed = True
        tasks = list(self._monitors.items())
        for _, task in tasks:
            task.cancel()
        for run_id, task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            with contextlib.suppress(Exception):
                await self.store.release_lease(run_id, self.owner)
        self._monitors.clear()
        await self.backend.close()

    # ---- requests
    def resolve_config(self, config: str) -> Path:
        """The YAML a request's ``config`` names, inside one of the config directories; InvalidArgument if none."""
        if not config:
            raise InvalidArgument("is required: a config name (tiny) or a YAML path", field="config")
        dirs = [d.resolve() for d in self.config.config_dirs]
        candidates: list[Path] = []
        if "/" not in config and not config.endswith((".yaml", ".yml")):
            candidates = [d / f"{config}{ext}" for d in dirs for ext in (".yaml", ".yml")]
        else:
            path = Path(config)
            candidates = [path] if path.is_absolute() else [d / path for d in dirs]
        for candidate in candidates:
            resolved = candidate.resolve()
            if resolved.is_file() and any(resolved.is_relative_to(d) for d in dirs):
                return resolved
        where = ", ".join(str(d) for d in dirs)
        raise InvalidArgument(
            f"no training config {config!r} in the server's config directories ({where})", field="config"
        )

    async def start_run(
        self, config: str, stages: Sequence[str] = (), data_root: str = "", idempotency_key: str = "", created_by=""
    ) -> tuple[RunRecord, bool]:
        """Record a run and start following it (its job is submitted by its monitor). Returns (run, created)."""
        if idempotency_key and not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise InvalidArgument(
                f"must be 1 to 128 characters of [A-Za-z0-9_.:-] (got {idempotency_key!r})", field="idempotency_key"
            )
        if len(data_root) > 4096 or "\0" in data_root:
            raise InvalidArgument("must be a path of at most 4096 characters", field="data_root")
        if len(stages) > 64:
            raise InvalidArgument(f"at most 64 stages (got {len(stages)})", field="stages")
        path = self.resolve_config(config)
        config_name, selected = await asyncio.to_thread(_check_config, path, list(stages))
        fingerprint = hashlib.sha256(
            json.dumps({"config": str(path), "stages": list(stages), "data_root": data_root}).encode()
        ).hexdigest()
        run_id = new_run_id()
        record = RunRecord(
            run_id=run_id,
            config=config,
            config_path=str(path),
            config_name=config_name,
            stages=selected,
            requested_stages=list(stages),
            data_root=data_root,
            idempotency_key=idempotency_key,
            output_dir=str((self.config.runs_root / run_id).resolve()),
            backend=self.backend.name,
            created_by=created_by,
            fingerprint=fingerprint,
            progress=[StageProgress(s) for s in selected],
        )
        record, created = await self.store.create(record)
        if created:
            log.info("run %s recorded (config %s, stages %s)", run_id, config_name, ",".join(selected))
        if not record.state.terminal:
            self._ensure_monitor(record.run_id)
        return record, created

    async def cancel_run(self, run_id: str) -> RunRecord:
        """Move an active run to CANCELLING and stop its job (CANCELLED at once if it was never submitted)."""

        def change(r: RunRecord) -> list | None:
            if r.state in (RunState.CANCELLING, RunState.CANCELLED):
                return None
            if r.state.terminal:
                raise FailedPrecondition(f"run {run_id} already finished ({r.state.value})", field="run_id")
            r.cancel_requested = True
            r.message = "cancelled by request"
            r.state = RunState.CANCELLED if not r.job_id else RunState.CANCELLING
            return []

        record = await self.store.update(run_id, change)
        if record.state == RunState.CANCELLING:
            await self.backend.stop(record.job_id)
            self._ensure_monitor(run_id)
        return record

    def command(self, record: RunRecord) -> list[str]:
        """The job's command line."""
        cmd = [*self.config.pipeline_command, "--config", record.config_path, "--out", record.output_dir]
        cmd.append("--no-progress")
        if record.requested_stages:
            cmd += ["--stages", ",".join(record.stages)]
        if record.data_root:
            cmd += ["--data-root", record.data_root]
        return cmd

    # ---- following runs
    def _ensure_monitor(self, run_id: str) -> None:
        task = self._monitors.get(run_id)
        if self._closed or (task is not None and not task.done()):
            return
        self._monitors[run_id] = asyncio.create_task(self._monitor(run_id), name=f"run-monitor-{run_id}")

    async def _monitor(self, run_id: str) -> None:
        interval = self.config.poll_interval_s
        try:
            while True:
                try:
                    if await self.store.acquire_lease(run_id, self.owner, self.lease_ms):
                        record = await self.tick(run_id)
                        if record.state.terminal:
                            await self.store.release_lease(run_id, self.owner)
                            return
                except NotFound:
                    return
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    log.warning("run %s: Redis unreachable (%s); retrying", run_id, exc)
                except Exception:
                    log.exception("run %s: monitor tick failed; retrying", run_id)
                await asyncio.sleep(interval)
        finally:
            if self._monitors.get(run_id) is asyncio.current_task():
                del self._monitors[run_id]

    async def tick(self, run_id: str) -> RunRecord:
        """One step of following a run: submit its job if it has none, else read the job's status and the run's
        progress and record what changed. Returns the record after the step."""
        record = await self.store.get(run_id)
        if record.state.terminal:
            return record
        if not record.job_id:
            return await self._submit(record)
        try:
            info = await self.backend.status(record.job_id)
        except Exception as exc:  # the backend is unreachable: keep the state, note why, try again next tick
            log.warning("run %s: cannot read job %s status: %s", run_id, record.job_id, exc)
            note = f"cannot reach the {self.backend.name} job backend: {exc}"
            return await self.store.update(run_id, lambda r: _note(r, note))
        if record.state == RunState.CANCELLING and not info.status.terminal:
            await self.backend.stop(record.job_id)  # repeated: the local backend escalates to SIGKILL
        failure = ""
        if info.status in (JobStatus.FAILED, JobStatus.LOST):
            failure = await self._failure_message(record, info)
        progress = await asyncio.to_thread(read_progress, record.output_dir, record.stages)
        return await self.store.update(run_id, lambda r: _sync(r, info, progress, failure))

    async def _submit(self, record: RunRecord) -> RunRecord:
        if record.cancel_requested:
            return await self.store.update(record.run_id, lambda r: _set_state(r, RunState.CANCELLED))
        try:
            job_id = await self.backend.submit(record.run_id, self.command(record), dict(self.config.job_env))
        except Exception as exc:
            attempts, error = record.submit_attempts + 1, f"{type(exc).__name__}: {exc}"
            log.warning("run %s: submission %d failed: %s", record.run_id, attempts, error)
            expired = time.time() - record.create_time > self.config.submit_timeout_s

            def failed(r: RunRecord) -> list:
                r.submit_attempts = attempts
                r.message = f"job submission failed ({attempts} attempts): {error}"
                if expired and not r.state.terminal:
                    r.state = RunState.FAILED
                return []

            return await self.store.update(record.run_id, failed)

        def submitted(r: RunRecord) -> list:
            r.job_id, r.message = job_id, ""
            r.submit_attempts += 1
            return []

        log.info("run %s: submitted as %s job %s", record.run_id, self.backend.name, job_id)
        return await self.store.update(record.run_id, submitted)

    async def _failure_message(self, record: RunRecord, info: JobInfo) -> str:
        """The job's note plus the last lines of its output that look like the cause."""
        tail = ""
        with contextlib.suppress(Exception):
            tail = await self.backend.logs_tail(record.job_id, 4000)
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        parts = [p for p in (info.message, cause[:500]) if p]
        return "; ".join(parts) or f"job {info.status.value.lower()}"


def _check_config(path: Path, stages: list[str]) -> tuple[str, list[str]]:
    """(config name, selected stages) of a config; InvalidArgument for an invalid config or an unknown stage."""
    from workflows.training.config import ConfigError, load_config
    from workflows.training.pipeline import select_stages

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise InvalidArgument(f"{path}: {exc}", field="config") from None
    try:
        return config.name, select_stages(config, stages)
    except ConfigError as exc:
        raise InvalidArgument(str(exc), field="stages") from None


def _note(record: RunRecord, message: str) -> list | None:
    if record.message == message:
        return None
    record.message = message
    return []


def _set_state(record: RunRecord, state: RunState) -> list:
    record.state = state
    return []


_JOB_TO_RUN = {
    JobStatus.PENDING: RunState.PENDING,
    JobStatus.RUNNING: RunState.RUNNING,
    JobStatus.SUCCEEDED: RunState.SUCCEEDED,
    JobStatus.FAILED: RunState.FAILED,
    JobStatus.LOST: RunState.FAILED,
}


def _sync(record: RunRecord, info: JobInfo, progress: list[StageProgress], failure: str) -> list | None:
    """Bring a record in step with its job's status and the progress on disk; the progress events to append."""
    events = progress_events(record.progress, progress)
    changed = bool(events) or [p.to_dict() for p in progress] != [p.to_dict() for p in record.progress]
    record.progress = progress
    if info.status == JobStatus.STOPPED:
        target = RunState.CANCELLED if record.cancel_requested else RunState.FAILED
        if target == RunState.FAILED:
            record.message = "the job was stopped outside the API"
    elif record.state == RunState.CANCELLING and not info.status.terminal:
        target = RunState.CANCELLING
    else:
        target = _JOB_TO_RUN[info.status]
        if target == RunState.FAILED:
            record.message = failure
        elif target == RunState.SUCCEEDED:
            record.message = ""
    if record.state == RunState.RUNNING and target == RunState.PENDING:
        target = RunState.RUNNING  # never back
    if target != record.state:
        record.state = target
        changed = True
    elif record.message and target in (RunState.RUNNING, RunState.PENDING) and record.message.startswith("cannot"):
        record.message = ""  # the backend answers again
        changed = True
    return events if changed else None
