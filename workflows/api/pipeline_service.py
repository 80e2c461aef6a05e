"""``ola.pipeline.v1.PipelineService``: the gRPC face of :class:`workflows.api.runs.RunManager`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb
from services.gen.ola.pipeline.v1 import pipeline_pb2_grpc
from workflows.api.auth import current_principal
from workflows.api.errors import InvalidArgument, rpc_method
from workflows.api.progress import DONE, PENDING, RUNNING
from workflows.api.runs import RunEvent, RunManager, RunRecord, RunState

log = logging.getLogger(__name__)

WATCH_POLL_MS = 1000  # how long one blocking read of the event stream waits before checking the call is alive

_STAGE_STATES = {PENDING: pb.STAGE_STATE_PENDING, RUNNING: pb.STAGE_STATE_RUNNING, DONE: pb.STAGE_STATE_DONE}


def state_to_proto(state: RunState | str) -> int:
    """RunState -> pb.RunState value ('' -> UNSPECIFIED)."""
    return pb.RunState.Value(f"RUN_STATE_{state}") if state else pb.RUN_STATE_UNSPECIFIED


def state_from_proto(value: int, field: str) -> RunState:
    """pb.RunState value -> RunState; InvalidArgument for UNSPECIFIED or an unknown number."""
    if value == pb.RUN_STATE_UNSPECIFIED or value not in pb.RunState.values():
        raise InvalidArgument(f"must be a RunState other than RUN_STATE_UNSPECIFIED (got {value})", field=field)
    return RunState(pb.RunState.Name(value).removeprefix("RUN_STATE_"))


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def run_to_proto(record: RunRecord) -> pb.Run:
    """The wire form of a run record."""
    run = pb.Run(
        run_id=record.run_id,
        state=state_to_proto(record.state),
        config=record.config,
        config_name=record.config_name,
        stages=record.stages,
        data_root=record.data_root,
        idempotency_key=record.idempotency_key,
        output_dir=record.output_dir,
        backend=record.backend,
        job_id=record.job_id,
        message=record.message,
        created_by=record.created_by,
        create_time=_timestamp(record.create_time),
        update_time=_timestamp(record.update_time),
    )
    if record.end_time is not None:
        run.end_time.CopyFrom(_timestamp(record.end_time))
    for p in record.progress:
        stage = run.stage_progress.add(
            name=p.name, state=_STAGE_STATES.get(p.state, pb.STAGE_STATE_UNSPECIFIED), step=p.step
        )
        stage.total_steps = p.total_steps
        if p.loss is not None:
            stage.loss = p.loss
    return run


def event_to_proto(event: RunEvent) -> pb.WatchRunResponse:
    """The wire form of a run event."""
    out = pb.WatchRunResponse(
        event_id=event.event_id, time=_timestamp(event.time), run_state=state_to_proto(event.state)
    )
    d = event.data
    if event.type == "state_changed":
        out.state_changed.CopyFrom(
            pb.StateChanged(
                from_state=state_to_proto(d.get("from_state", "")),
                to_state=state_to_proto(d["to_state"]),
                message=d.get("message", ""),
            )
        )
    elif event.type == "stage_started":
        out.stage_started.CopyFrom(pb.StageStarted(stage=d["stage"], total_steps=int(d.get("total_steps") or 0)))
    elif event.type == "stage_finished":
        finished = pb.StageFinished(stage=d["stage"], steps=int(d.get("steps") or 0), seconds=d.get("seconds") or 0.0)
        if d.get("final_loss") is not None:
            finished.final_loss = d["final_loss"]
        out.stage_finished.CopyFrom(finished)
    elif event.type == "step_progress":
        out.step_progress.CopyFrom(
            pb.StepProgress(stage=d["stage"], step=d["step"], total_steps=d["total_steps"], loss=d["loss"])
        )
    elif event.type == "run_finished":
        out.run_finished.CopyFrom(pb.RunFinished(state=state_to_proto(d["state"]), message=d.get("message", "")))
    else:  # an event type a newer server wrote: skip its payload, keep the id so watchers can resume past it
        log.warning("unknown run event type %r", event.type)
    return out


class PipelineServicer(pipeline_pb2_grpc.PipelineServiceServicer):
    """StartRun, GetRun, ListRuns, WatchRun, CancelRun over a :class:`RunManager`."""

    def __init__(self, manager: RunManager) -> None:
        self.manager = manager

    @rpc_method
    async def StartRun(self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext) -> pb.StartRunResponse:
        principal = current_principal()
        record, created = await self.manager.start_run(
            request.config,
            list(request.stages),
            request.data_root,
            request.idempotency_key,
            created_by=principal.name if principal else "",
        )
        return pb.StartRunResponse(run=run_to_proto(record), created=created)

    @rpc_method
    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=run_to_proto(await self.manager.store.get(request.run_id)))

    @rpc_method
    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        states = [state_from_proto(s, f"states[{i}]") for i, s in enumerate(request.states)]
        runs, token = await self.manager.store.list(
            page_size=request.page_size, page_token=request.page_token, states=states
        )
        return pb.ListRunsResponse(runs=[run_to_proto(r) for r in runs], next_page_token=token)

    @rpc_method
    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRunResponse]:
        store = self.manager.store
        record = await store.get(request.run_id)
        cursor = request.after_event_id
        if cursor and not _valid_stream_id(cursor):
            raise InvalidArgument(f"is not an event id from WatchRun (got {cursor!r})", field="after_event_id")
        while True:
            events = await store.events(record.run_id, cursor, block_ms=WATCH_POLL_MS)
            for event in events:
                cursor = event.event_id
                yield event_to_proto(event)
                if event.type == "run_finished":
                    return
            if not events:
                # a run that finished before its final event existed (or whose history was trimmed) ends the stream
                current = await store.get(record.run_id)
                if current.state.terminal and not await store.events(record.run_id, cursor):
                    return

    @rpc_method
    async def CancelRun(self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext) -> pb.CancelRunResponse:
        return pb.CancelRunResponse(run=run_to_proto(await self.manager.cancel_run(request.run_id)))


def _valid_stream_id(value: str) -> bool:
    first, sep, second = value.partition("-")
    return bool(sep) and first.isdigit() and second.isdigit()
