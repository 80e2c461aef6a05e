"""Where a run's command executes: the :class:`JobBackend` protocol and its two implementations.

- :class:`RayJobBackend`: Ray Jobs (``ray.job_submission.JobSubmissionClient``) on a cluster's dashboard address.
  The job's submission id is the run id, so submitting twice (an API server that crashed mid-submission and
  retries) never starts a second job.
- :class:`SubprocessJobBackend`: a process group on the API host, for a single machine without Ray. Each job keeps
  its state in ``<jobs_dir>/<job id>/`` (``job.json``: pid and start time; ``job.log``: stdout and stderr;
  ``exit_code``: written when the command ends; ``stop_requested``), so a restarted API server re-attaches to jobs
  it did not start.

Both are asynchronous (blocking client calls run in a worker thread) and every method is safe to repeat.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


class JobStatus(enum.StrEnum):
    """A job's status as a backend reports it."""

    PENDING = "PENDING"  # accepted, not started (waiting for resources)
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"  # the command exited 0
    FAILED = "FAILED"  # the command exited non-zero or could not start
    STOPPED = "STOPPED"  # stopped by stop()
    LOST = "LOST"  # the backend does not know the job (any more)

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.PENDING, JobStatus.RUNNING)


@dataclass(frozen=True)
class JobInfo:
    """A job's status and the backend's note about it (an exit code, a failure's cause)."""

    status: JobStatus
    message: str = ""


@runtime_checkable
class JobBackend(Protocol):
    """Runs commands as jobs named by the caller."""

    name: str

    async def submit(self, job_id: str, command: list[str], env: dict[str, str]) -> str:
        """Start ``command`` as job ``job_id`` (idempotent: an existing job of that id is kept). Returns the id."""
        ...

    async def status(self, job_id: str) -> JobInfo:
        """The job's status (LOST for an unknown id)."""
        ...

    async def stop(self, job_id: str) -> None:
        """Ask the job to stop (repeatable; a finished job is left as it is)."""
        ...

    async def logs_tail(self, job_id: str, max_chars: int = 4000) -> str:
        """The end of the job's output ('' when there is none)."""
        ...

    async def close(self) -> None:
        """Release clients; jobs keep running."""
        ...


# ---------------------------------------------------------------------------------------------------- Ray Jobs
class RayJobBackend:
    """Ray Jobs through the dashboard's job API (``http://HEAD:8265`` or ``ray://`` addresses as Ray accepts them).

    Args:
        address: the dashboard address.
        cwd: working directory of the job's entrypoint on the cluster (the entrypoint becomes ``cd CWD && ...``);
            None: Ray's default.
        entrypoint_num_cpus: CPUs reserved for the job's driver (the training itself asks Ray for its own).
    """

    name = "ray"

    def __init__(self, address: str, *, cwd: str | None = None, entrypoint_num_cpus: float = 0.0) -> None:
        self.address = address
        self.cwd = cwd
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self._client = None

    async def _get_client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = await asyncio.to_thread(JobSubmissionClient, self.address)
        return self._client

    async def submit(self, job_id: str, command: list[str], env: dict[str, str]) -> str:
        client = await self._get_client()
        entrypoint = shlex.join(command)
        if self.cwd:
            entrypoint = f"cd {shlex.quote(self.cwd)} && {entrypoint}"
        existing = await self._info(job_id)
        if existing is not None:
            log.info("ray job %s already submitted; re-attaching", job_id)
            return job_id
        await asyncio.to_thread(
            client.submit_job,
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={"env_vars": dict(env)},
            metadata={"ola_run_id": job_id},
            entrypoint_num_cpus=self.entrypoint_num_cpus,
        )
        log.info("submitted ray job %s: %s", job_id, entrypoint)
        return job_id

    async def _info(self, job_id: str):
        client = await self._get_client()
        try:
            return await asyncio.to_thread(client.get_job_info, job_id)
        except RuntimeError as exc:  # the SDK raises RuntimeError("Job ... does not exist") for unknown ids
            if "does not exist" in str(exc):
                return None
            raise

    async def status(self, job_id: str) -> JobInfo:
        info = await self._info(job_id)
        if info is None:
            return JobInfo(JobStatus.LOST, f"Ray does not know job {job_id}")
        status = JobStatus(str(info.status.value if hasattr(info.status, "value") else info.status))
        return JobInfo(status, info.message or "")

    async def stop(self, job_id: str) -> None:
        client = await self._get_client()
        info = await self._info(job_id)
        if info is not None and not JobStatus(str(info.status.value)).terminal:
            await asyncio.to_thread(client.stop_job, job_id)

    async def logs_tail(self, job_id: str, max_chars: int = 4000) -> str:
        client = await self._get_client()
        try:
            logs = await asyncio.to_thread(client.get_job_logs, job_id)
        except RuntimeError:
            return ""
        return logs[-max_chars:]

    async def close(self) -> None:
        self._client = None


# ------------------------------------------------------------------------------------------- local subprocesses
_EXIT_FILE = "exit_code"
_STOP_FILE = "stop_requested"
_JOB_FILE = "job.json"
_LOG_FILE = "job.log"
# The command runs under sh, which records its exit status atomically when it ends.
_WRAPPER = (
    'rc=0; "$@" || rc=$?; '
    'printf "%s" "$rc" > "$OLA_JOB_DIR/exit_code.tmp" && mv "$OLA_JOB_DIR/exit_code.tmp" "$OLA_JOB_DIR/exit_code"'
)


def _process_start_time(pid: int) -> str | None:
    """The start time of a running process (field 22 of /proc/PID/stat), to tell it from a later process with its
    pid; None when there is no such process or it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent: not running
        return None
    return fields[19]


def group_alive(pgid: int) -> bool:
    """True while any process of process group ``pgid`` is running (exited, unreaped ones do not count)."""
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


# A launcher's rendezvous settings belong to the process that holds them (an API that once trained in-process, a
# torchrun worker); a job is a process group of its own and must not inherit them.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _own_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}


class SubprocessJobBackend:
    """Jobs as local process groups (see the module docstring). ``stop`` sends SIGTERM to the group, and SIGKILL
    when it is repeated after ``kill_after_s``."""

    name = "local"

    def __init__(self, jobs_dir: str | Path, *, cwd: str | Path | None = None, kill_after_s: float = 10.0) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.cwd = str(cwd) if cwd is not None else None
        self.kill_after_s = kill_after_s
        self._children: dict[str, subprocess.Popen] = {}

    def _dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"job_id {job_id!r} is not a plain name")
        return self.jobs_dir / job_id

    def log_path(self, job_id: str) -> Path:
        """The job's combined stdout and stderr."""
        return self._dir(job_id) / _LOG_FILE

    async def submit(self, job_id: str, command: list[str], env: dict[str, str]) -> str:
        directory = self._dir(job_id)
        if (directory / _JOB_FILE).is_file():
            return job_id
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / _LOG_FILE, "ab") as out:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, "ola-job", *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env={**_own_environment(), **env, "OLA_JOB_DIR": str(directory)},
                start_new_session=True,  # its own process group: stop() signals the command and its children
            )
        self._children[job_id] = proc
        record = {"pid": proc.pid, "start_time": _process_start_time(proc.pid), "command": command}
        tmp = directory / f".{_JOB_FILE}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, directory / _JOB_FILE)
        log.info("started local job %s (pid %d): %s", job_id, proc.pid, shlex.join(command))
        return job_id

    def _alive(self, job_id: str, record: dict) -> bool:
        """Whether the job's command or any process it started (its process group) still runs."""
        proc = self._children.get(job_id)
        pid = int(record["pid"])
        if proc is not None:
            leader = proc.poll() is None  # our child: poll() also reaps it
        else:
            started = _process_start_time(pid)
            leader = started is not None and started == record.get("start_time")
        return leader or group_alive(pid)

    async def status(self, job_id: str) -> JobInfo:
        directory = self._dir(job_id)
        try:
            record = json.loads((directory / _JOB_FILE).read_text())
        except (OSError, ValueError):
            return JobInfo(JobStatus.LOST, f"no local job {job_id}")
        alive = self._alive(job_id, record)
        exit_file = directory / _EXIT_FILE
        if exit_file.is_file():
            code = exit_file.read_text().strip()
            if code == "0":
                return JobInfo(JobStatus.SUCCEEDED, "exit code 0")
            if (directory / _STOP_FILE).is_file():
                return JobInfo(JobStatus.STOPPED, f"stopped (exit code {code})")
            return JobInfo(JobStatus.FAILED, f"exit code {code}")
        if alive:
            return JobInfo(JobStatus.RUNNING)
        if (directory / _STOP_FILE).is_file():
            return JobInfo(JobStatus.STOPPED, "stopped")
        return JobInfo(JobStatus.FAILED, "the job's process ended without an exit status (killed)")

    async def stop(self, job_id: str) -> None:
        directory = self._dir(job_id)
        try:
            record = json.loads((directory / _JOB_FILE).read_text())
        except (OSError, ValueError):
            return
        stop_file = directory / _STOP_FILE
        first = not stop_file.is_file()
        if first:
            stop_file.write_text(repr(time.time()))
        if not self._alive(job_id, record):
            return
        elapsed = time.time() - float(stop_file.read_text() or 0)
        sig = signal.SIGKILL if not first and elapsed >= self.kill_after_s else signal.SIGTERM
        try:
            os.killpg(int(record["pid"]), sig)  # the session leader's pid is the group id
            log.info("sent %s to local job %s", sig.name, job_id)
        except ProcessLookupError:
            pass

    async def logs_tail(self, job_id: str, max_chars: int = 4000) -> str:
        path = self.log_path(job_id)
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_chars))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    async def close(self) -> None:
        for proc in self._children.values():
            proc.poll()


def default_pipeline_command() -> list[str]:
    """``ola pipeline run`` through this interpreter (works without the ``ola`` script on PATH)."""
    return [sys.executable, "-m", "ola_model.cli", "pipeline", "run"]
