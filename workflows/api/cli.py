"""Command line of the control-plane API: the server, API keys, and clients of PipelineService and ModelService.

    ola api serve --port 50051 --redis-url redis://HOST:6379/0 [--ray-address http://HEAD:8265] --runs-root DIR
        [--deploy serve --serve-config PLATFORM.yaml | --deploy kuberay --rayservice NAME --namespace NS]
    ola apikey create --name ci-bot --role trigger        # prints the key once; Redis keeps only its digest
    ola apikey list [--all] | ola apikey revoke KEY_ID
    ola pipeline start --config tiny [--stages 1a,1b] [--data-root DIR] [--idempotency-key K] [--watch]
    ola pipeline get RUN_ID | list [--state RUNNING] | watch RUN_ID | cancel RUN_ID
    ola models list [--model ola] | ola models promote VERSION [--force-champion --reason TEXT]
    ola rollout start [--version V] | status | abort [--reason TEXT] | promote [--reason TEXT]

Client commands reach the server at ``--target`` (default ``$OLA_API_TARGET``, else ``127.0.0.1:50051``) with the key
``--api-key`` (default ``$OLA_API_KEY``). ``ola apikey`` talks to Redis directly (an operator's tool: whoever can
reach Redis administers the keys) with ``--redis-url`` (default ``$OLA_REDIS_URL``) and the server's pepper from
``$OLA_API_KEY_PEPPER``.

Exit status: 0 success; 1 a run that did not succeed (``watch``, ``start --watch``), a gate that did not pass, or a
server-side failure; 2 a request the server refused (invalid, not found, not allowed, wrong state) or bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def register(subparsers: Any) -> None:
    """Add ``api``, ``apikey``, ``models`` and ``rollout`` to the ``ola`` command."""
    api = subparsers.add_parser("api", help="the control-plane gRPC API (PipelineService, ModelService)")
    api_sub = api.add_subparsers(dest="api_command", required=True)
    p = api_sub.add_parser("serve", help="run the API server in the foreground")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0; every call needs an API key)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051)")
    p.add_argument(
        "--redis-url",
        default=None,
        help=f"Redis of keys, runs, rollouts (default $OLA_REDIS_URL or {DEFAULT_REDIS_URL})",
    )
    p.add_argument("--ray-address", default=None, help="Ray dashboard address for Ray Jobs (default: local processes)")
    p.add_argument("--runs-root", type=Path, default=Path(".cache/runs"), help="where runs write (default .cache/runs)")
    p.add_argument(
        "--config-dir",
        type=Path,
        action="append",
        default=[],
        help="where configs may come from (repeatable; default workflows/configs)",
    )
    p.add_argument(
        "--pipeline-command",
        default=None,
        help="the job's command before its arguments (default: python -m ola_model.cli pipeline run)",
    )
    p.add_argument("--job-cwd", default=None, help="working directory of the jobs (default: the backend's)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between looks at a run's job (default 1)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--policy", type=Path, default=None, help="promotion policy YAML (default workflows/configs/promotion.yaml)"
    )
    p.add_argument(
        "--rollout-model",
        action="append",
        default=[],
        help="model whose rollouts this server ticks (repeatable; default ola)",
    )
    p.add_argument(
        "--rollout-tick",
        type=float,
        default=5.0,
        help="seconds between rollout ticks; 0: another process ticks (default 5)",
    )
    p.add_argument(
        "--probe-gateway",
        default=None,
        metavar="HOST:PORT",
        help="the omni gateway the canary's quality probes are asked through (the Serve gRPC proxy); "
        "default: probes are skipped",
    )
    p.add_argument("--no-models", action="store_true", help="serve PipelineService only (no MLflow needed)")
    p.add_argument("--prefix", default=None, help="Redis key prefix of keys and runs (default ola:api:)")
    d = p.add_argument_group("deploying versions around rollouts (DeployingController)")
    d.add_argument(
        "--deploy",
        choices=("none", "serve", "kuberay"),
        default="none",
        help="bring challengers up before they get traffic and remove them after: on a local Ray Serve (serve), "
        "a KubeRay RayService (kuberay), or not at all (none, default)",
    )
    d.add_argument("--rayservice", default=None, help="the RayService name (required with --deploy kuberay)")
    d.add_argument("--namespace", default="default", help="the RayService's namespace (default: default)")
    d.add_argument("--kubeconfig", type=Path, default=None, help="kubeconfig file (default: in-cluster, then ~/.kube)")
    d.add_argument(
        "--serve-config", type=Path, default=None, help="the platform YAML `ola serve` runs (--deploy serve)"
    )
    d.add_argument("--serve-grpc-address", default=None, help="the Serve gRPC proxy (default: from --serve-config)")
    d.add_argument(
        "--models-root",
        type=Path,
        default=Path(".cache/models"),
        help="where registered versions are downloaded before they are served (default .cache/models)",
    )
    d.add_argument("--served-root", default=None, help="--models-root as the replicas see it (default: the same)")
    d.add_argument(
        "--keep-previous",
        type=float,
        default=3600.0,
        help="seconds the previous champion stays served after a promotion (default 3600)",
    )
    d.add_argument(
        "--deploy-timeout", type=float, default=900.0, help="seconds a version may take to serve (default 900)"
    )
    p.set_defaults(func=cmd_serve)

    keys = subparsers.add_parser("apikey", help="create, list and revoke API keys (directly in Redis)")
    keys_sub = keys.add_subparsers(dest="apikey_command", required=True)
    p = keys_sub.add_parser("create", help="make a key and print it (shown once)")
    p.add_argument("--name", required=True, help="who or what uses the key (1-64 of [A-Za-z0-9_.@-])")
    p.add_argument("--role", required=True, choices=("read", "trigger", "admin"), help="read < trigger < admin")
    p.set_defaults(func=cmd_apikey_create)
    p = keys_sub.add_parser("list", help="list keys (never their secrets)")
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p.set_defaults(func=cmd_apikey_list)
    p = keys_sub.add_parser("revoke", help="revoke a key for good")
    p.add_argument("key_id", help="the key's id (the 12 hex characters after ola_)")
    p.set_defaults(func=cmd_apikey_revoke)
    for sp in keys_sub.choices.values():
        sp.add_argument("--redis-url", default=None, help="Redis URL (default $OLA_REDIS_URL)")
        sp.add_argument("--prefix", default=None, help="Redis key prefix (default ola:api:)")
        sp.add_argument("--json", action="store_true", help="print JSON")

    models = subparsers.add_parser("models", help="registered model versions and gated promotion (ModelService)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    p = models_sub.add_parser("list", help="list a model's versions, metrics and aliases")
    p.set_defaults(func=cmd_models_list)
    p = models_sub.add_parser("promote", help="gate a version and make it the challenger (or force the champion)")
    p.add_argument("version", help="the version number")
    p.add_argument("--force-champion", action="store_true", help="skip the gate, set champion (admin key)")
    p.add_argument("--reason", default="", help="why (required with --force-champion)")
    p.set_defaults(func=cmd_models_promote)
    for sp in models_sub.choices.values():
        sp.add_argument("--model", default="ola", help="registered model name (default ola)")
        _client_options(sp)

    rollout = subparsers.add_parser("rollout", help="canary rollouts of the challenger (ModelService)")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", required=True)
    p = rollout_sub.add_parser("start", help="start a rollout of the challenger (admin key)")
    p.add_argument("--version", default="", help="the challenger version expected (default: whatever it is)")
    p.set_defaults(func=cmd_rollout, action="start")
    p = rollout_sub.add_parser("status", help="the current (or last) rollout")
    p.set_defaults(func=cmd_rollout, action="status")
    p = rollout_sub.add_parser("abort", help="stop the running rollout; the champion stays")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.set_defaults(func=cmd_rollout, action="abort")
    p = rollout_sub.add_parser("promote", help="make the running rollout's challenger the champion now (admin key)")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.set_defaults(func=cmd_rollout, action="promote")
    for sp in rollout_sub.choices.values():
        sp.add_argument("--model", default="ola", help="registered model name (default ola)")
        _client_options(sp)


def add_pipeline_client_commands(pipeline_subparsers: Any) -> None:
    """Add ``start``, ``get``, ``list``, ``watch`` and ``cancel`` to the ``ola pipeline`` group (its subparsers)."""
    p = pipeline_subparsers.add_parser("start", help="start a training run through the API (a job on the cluster)")
    p.add_argument("--config", required=True, help="a config name (tiny) or a YAML path in the server's config dirs")
    p.add_argument("--stages", default="", help="comma-separated stage names (default: all)")
    p.add_argument("--data-root", default="", help="override the config's data.root (a path the job can read)")
    p.add_argument("--idempotency-key", default="", help="the same key returns the same run, never a second one")
    p.add_argument("--watch", action="store_true", help="then follow the run to its end")
    p.set_defaults(func=cmd_pipeline_start)
    p = pipeline_subparsers.add_parser("get", help="show a run")
    p.add_argument("run_id")
    p.set_defaults(func=cmd_pipeline_get)
    p = pipeline_subparsers.add_parser("list", help="list runs, newest first")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        help="only runs in this state (repeatable): PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED",
    )
    p.add_argument("--limit", type=int, default=20, help="runs per page (default 20)")
    p.add_argument("--page-token", default="", help="next_page_token of a previous page")
    p.set_defaults(func=cmd_pipeline_list)
    p = pipeline_subparsers.add_parser("watch", help="stream a run's events until it ends")
    p.add_argument("run_id")
    p.add_argument("--after", default="", help="resume after this event id")
    p.set_defaults(func=cmd_pipeline_watch)
    p = pipeline_subparsers.add_parser("cancel", help="cancel a run")
    p.add_argument("run_id")
    p.set_defaults(func=cmd_pipeline_cancel)
    for name in ("start", "get", "list", "watch", "cancel"):
        _client_options(pipeline_subparsers.choices[name])


# ------------------------------------------------------------------------------------------------- helpers
def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help=f"HOST:PORT of the API (default $OLA_API_TARGET or {DEFAULT_TARGET})")
    p.add_argument("--api-key", default=None, help="API key (default $OLA_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of a call in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print JSON")


class _Client:
    """A channel to the API with the key as call metadata."""

    def __init__(self, args: argparse.Namespace) -> None:
        import grpc

        target = args.target or os.environ.get("OLA_API_TARGET") or DEFAULT_TARGET
        key = args.api_key or os.environ.get("OLA_API_KEY")
        if not key:
            raise SystemExit("error: no API key: pass --api-key or set OLA_API_KEY (ola apikey create makes one)")
        self.channel = grpc.insecure_channel(target)
        self.metadata = [("x-api-key", key)]
        self.timeout = args.timeout

    def pipeline(self):
        from services.gen.ola.pipeline.v1 import pipeline_pb2_grpc

        return pipeline_pb2_grpc.PipelineServiceStub(self.channel)

    def models(self):
        from services.gen.ola.models.v1 import models_pb2_grpc

        return models_pb2_grpc.ModelServiceStub(self.channel)

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.channel.close()


def _rpc_errors(fn):
    """Run a client command; a gRPC error becomes a message on stderr and exit status 2 (refused) or 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        import grpc

        refused = {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.ALREADY_EXISTS,
        }
        try:
            return fn(args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2 if exc.code() in refused else 1

    return wrapper


def _dump(message: Any) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(message, preserving_proto_field_name=True, indent=2)


def _run_line(run: Any) -> str:
    from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb

    state = pb.RunState.Name(run.state).removeprefix("RUN_STATE_")
    progress = ", ".join(
        f"{s.name} {s.step}/{s.total_steps}" + (f" loss {s.loss:.4f}" if s.HasField("loss") else "")
        for s in run.stage_progress
    )
    line = f"{run.run_id}  {state:<10}  {run.config_name}  [{progress}]"
    return line + (f"  {run.message}" if run.message else "")


def _event_line(event: Any) -> str:
    from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb

    def name(state: int) -> str:
        return pb.RunState.Name(state).removeprefix("RUN_STATE_")

    kind = event.WhichOneof("event")
    body = getattr(event, kind) if kind else None
    if kind == "state_changed":
        moved = f"{name(body.from_state)} -> " if body.from_state else ""
        text = f"state {moved}{name(body.to_state)}" + (f": {body.message}" if body.message else "")
    elif kind == "stage_started":
        text = (
            f"stage {body.stage} started ({body.total_steps} steps)"
            if body.total_steps
            else f"stage {body.stage} started"
        )
    elif kind == "step_progress":
        text = f"stage {body.stage} step {body.step}/{body.total_steps} loss {body.loss:.4f}"
    elif kind == "stage_finished":
        loss = f", final loss {body.final_loss:.4f}" if body.HasField("final_loss") else ""
        text = f"stage {body.stage} finished: {body.steps} steps in {body.seconds:.1f} s{loss}"
    elif kind == "run_finished":
        text = f"run {name(body.state)}" + (f": {body.message}" if body.message else "")
    else:
        text = "(unknown event)"
    return f"{event.time.ToDatetime().strftime('%H:%M:%S')}  {text}"


def _watch(client: _Client, run_id: str, after: str, as_json: bool) -> int:
    from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb

    final = pb.RUN_STATE_UNSPECIFIED
    # no deadline: a run can train for days; Ctrl-C ends the watch, not the run
    for event in client.pipeline().WatchRun(
        pb.WatchRunRequest(run_id=run_id, after_event_id=after), metadata=client.metadata
    ):
        print(_dump(event) if as_json else _event_line(event), flush=True)
        final = event.run_state  # the stream ends when the run does: its last state is the run's final one
    return 0 if final == pb.RUN_STATE_SUCCEEDED else 1


# ------------------------------------------------------------------------------------------------- server
def deploy_config(args: argparse.Namespace) -> Any:
    """The :class:`~workflows.api.model_service.DeployConfig` of ``ola api serve``'s ``--deploy`` options (None for
    ``--deploy none``). Raises ValueError naming the option that is missing or wrong."""
    from workflows.api.model_service import DeployConfig

    if args.deploy == "none":
        return None
    if args.no_models:
        raise ValueError(f"--deploy {args.deploy}: needs the ModelService (drop --no-models)")
    if args.deploy == "kuberay" and not args.rayservice:
        raise ValueError("--rayservice: the RayService name is required with --deploy kuberay")
    if args.deploy == "serve" and args.serve_config is None:
        raise ValueError("--serve-config: the platform YAML `ola serve` runs is required with --deploy serve")
    return DeployConfig(
        kind=args.deploy,
        rayservice=args.rayservice,
        namespace=args.namespace,
        kubeconfig=args.kubeconfig,
        serve_config=args.serve_config,
        serve_grpc_address=args.serve_grpc_address,
        models_root=args.models_root.resolve(),
        served_root=args.served_root,
        keep_previous_s=args.keep_previous,
        timeout_s=args.deploy_timeout,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import shlex

    from workflows.api.auth import DEFAULT_PREFIX
    from workflows.api.jobs import default_pipeline_command
    from workflows.api.model_service import ModelServiceConfig
    from workflows.api.server import REPO_CONFIGS, ServerConfig, serve

    if args.poll_interval <= 0:
        print(f"error: --poll-interval must be > 0 seconds (got {args.poll_interval})", file=sys.stderr)
        return 2
    try:
        deploy = deploy_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        redis_url=args.redis_url or os.environ.get("OLA_REDIS_URL") or DEFAULT_REDIS_URL,
        runs_root=args.runs_root.resolve(),
        port=args.port,
        host=args.host,
        ray_address=args.ray_address,
        config_dirs=[d.resolve() for d in args.config_dir] or [REPO_CONFIGS],
        pipeline_command=shlex.split(args.pipeline_command) if args.pipeline_command else default_pipeline_command(),
        # jobs register their stages in the registry this server's ModelService reads
        job_env={"MLFLOW_TRACKING_URI": args.mlflow_uri} if args.mlflow_uri else {},
        job_cwd=args.job_cwd,
        poll_interval_s=args.poll_interval,
        prefix=args.prefix or DEFAULT_PREFIX,
        pepper=os.environ.get("OLA_API_KEY_PEPPER", ""),
        models=None
        if args.no_models
        else ModelServiceConfig(
            tracking_uri=args.mlflow_uri,
            policy_path=args.policy,
            rollout_models=args.rollout_model or ["ola"],
            rollout_tick_s=args.rollout_tick,
            deploy=deploy,
            probe_gateway=args.probe_gateway,
        ),
    )
    import redis.exceptions

    from workflows.lifecycle.deploy import DeployError
    from workflows.lifecycle.policy import PolicyError

    try:
        asyncio.run(serve(config))
    except DeployError as exc:
        print(f"error: --deploy {args.deploy}: {exc}", file=sys.stderr)
        return 2
    except redis.exceptions.ConnectionError as exc:
        print(f"error: cannot reach Redis at {config.redis_url}: {exc}", file=sys.stderr)
        return 1
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------- API keys
def _with_keys(args: argparse.Namespace, action):
    import redis.asyncio as aioredis

    from workflows.api.auth import DEFAULT_PREFIX, ApiKeyStore

    async def main():
        client = aioredis.Redis.from_url(args.redis_url or os.environ.get("OLA_REDIS_URL") or DEFAULT_REDIS_URL)
        try:
            store = ApiKeyStore(
                client, prefix=args.prefix or DEFAULT_PREFIX, pepper=os.environ.get("OLA_API_KEY_PEPPER", "")
            )
            return await action(store)
        finally:
            await client.aclose()

    return asyncio.run(main())


def _keys_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        import redis.exceptions

        from workflows.api.errors import ApiError

        try:
            return fn(args)
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except redis.exceptions.ConnectionError as exc:
            print(f"error: cannot reach Redis: {exc}", file=sys.stderr)
            return 1

    return wrapper


@_keys_errors
def cmd_apikey_create(args: argparse.Namespace) -> int:
    info, key = _with_keys(args, lambda store: store.create(args.name, args.role))
    if args.json:
        print(json.dumps({**info.to_dict(), "api_key": key}, indent=2))
    else:
        print(key)
        print(
            f"key id {info.key_id}, name {info.name}, role {info.role.label}; the key is shown only now",
            file=sys.stderr,
        )
    return 0


@_keys_errors
def cmd_apikey_list(args: argparse.Namespace) -> int:
    infos = _with_keys(args, lambda store: store.list(include_revoked=args.all))
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    import time

    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(i.created_at))
        print(f"{i.key_id}  {i.role.label:<8}  {i.name:<24}  created {created}" + ("  REVOKED" if i.revoked else ""))
    return 0


@_keys_errors
def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    info = _with_keys(args, lambda store: store.revoke(args.key_id))
    print(json.dumps(info.to_dict(), indent=2) if args.json else f"revoked {info.key_id} ({info.name})")
    return 0


# ------------------------------------------------------------------------------------------------- pipeline
@_rpc_errors
def cmd_pipeline_start(args: argparse.Namespace) -> int:
    from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    request = pb.StartRunRequest(
        config=args.config, stages=stages, data_root=args.data_root, idempotency_key=args.idempotency_key
    )
    with _Client(args) as client:
        reply = client.pipeline().StartRun(request, metadata=client.metadata, timeout=client.timeout)
        if args.json:
            print(_dump(reply))
        else:
            print(_run_line(reply.run) + ("" if reply.created else "  (existing run for this idempotency key)"))
        return _watch(client, reply.run.run_id, "", args.json) if args.watch else 0


@_rpc_errors
def cmd_pipeline_get(args: argparse.Namespace) -> int:
    from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb

    with _Client(args) as client:
        run = (
            client.pipeline()
            .GetRun(pb.GetRunRequest(run_id=args.run_id), metadata=client.metadata, timeout=client.timeout)
            .run
        )
    print(_dump(run) if args.json else _run_line(run))
    return 0


@_rpc_errors
def cmd_pipeline_list(args: argparse.Namespace) -> int:
    from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb

    states = []
    for s in args.state:
        name = f"RUN_STATE_{s.upper()}"
        if name not in pb.RunState.keys() or name == "RUN_STATE_UNSPECIFIED":
            print(
                f"error: --state {s!r} is not one of PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED",
                file=sys.stderr,
            )
            return 2
        states.append(pb.RunState.Value(name))
    request = pb.ListRunsRequest(page_size=args.limit, page_token=args.page_token, states=states)
    with _Client(args) as client:
        reply = client.pipeline().ListRuns(request, metadata=client.metadata, timeout=client.timeout)
    if args.json:
        print(_dump(reply))
    else:
        for run in reply.runs:
            print(_run_line(run))
        if reply.next_page_token:
            print(f"more: --page-token {reply.next_page_token}", file=sys.stderr)
    return 0


@_rpc_errors
def cmd_pipeline_watch(args: argparse.Namespace) -> int:
    with _Client(args) as client:
        return _watch(client, args.run_id, args.after, args.json)


@_rpc_errors
def cmd_pipeline_cancel(args: argparse.Namespace) -> int:
    from services.gen.ola.pipeline.v1 import pipeline_pb2 as pb

    with _Client(args) as client:
        run = (
            client.pipeline()
            .CancelRun(pb.CancelRunRequest(run_id=args.run_id), metadata=client.metadata, timeout=client.timeout)
            .run
        )
    print(_dump(run) if args.json else _run_line(run))
    return 0


# ------------------------------------------------------------------------------------------------- models
@_rpc_errors
def cmd_models_list(args: argparse.Namespace) -> int:
    from services.gen.ola.models.v1 import models_pb2 as pb

    with _Client(args) as client:
        reply = client.models().ListVersions(
            pb.ListVersionsRequest(model_name=args.model), metadata=client.metadata, timeout=client.timeout
        )
    if args.json:
        print(_dump(reply))
        return 0
    for v in reply.versions:
        metrics = " ".join(f"{m.name}={m.value:g}" for m in v.metrics)
        aliases = f" @{',@'.join(v.aliases)}" if v.aliases else ""
        stage = next((t.value for t in v.tags if t.key == "stage"), "")
        print(f"{v.model_name} v{v.version}{aliases}  stage {stage or '-'}  {metrics}")
    return 0


@_rpc_errors
def cmd_models_promote(args: argparse.Namespace) -> int:
    from services.gen.ola.models.v1 import models_pb2 as pb

    request = pb.PromoteVersionRequest(
        model_name=args.model, version=args.version, force_champion=args.force_champion, reason=args.reason
    )
    with _Client(args) as client:
        reply = client.models().PromoteVersion(request, metadata=client.metadata, timeout=client.timeout)
    if args.json:
        print(_dump(reply))
    elif reply.promoted:
        print(f"{args.model} v{args.version} is now the {reply.alias}")
    else:
        print(f"{args.model} v{args.version} did not pass the gate:")
        for reason in reply.gate.reasons:
            print(f"  {reason}")
    return 0 if reply.promoted else 1


# ------------------------------------------------------------------------------------------------- rollouts
@_rpc_errors
def cmd_rollout(args: argparse.Namespace) -> int:
    from services.gen.ola.models.v1 import models_pb2 as pb

    with _Client(args) as client:
        stub, kw = client.models(), {"metadata": client.metadata, "timeout": client.timeout}
        if args.action == "start":
            reply = stub.StartRollout(pb.StartRolloutRequest(model_name=args.model, version=args.version), **kw)
        elif args.action == "status":
            reply = stub.GetRollout(pb.GetRolloutRequest(model_name=args.model), **kw)
        elif args.action == "abort":
            reply = stub.AbortRollout(pb.AbortRolloutRequest(model_name=args.model, reason=args.reason), **kw)
        else:
            reply = stub.PromoteRollout(pb.PromoteRolloutRequest(model_name=args.model, reason=args.reason), **kw)
    r = reply.rollout
    if args.json:
        print(_dump(r))
        return 0
    status = pb.RolloutStatus.Name(r.status).removeprefix("ROLLOUT_STATUS_").lower()
    print(
        f"rollout {r.rollout_id} of {r.model_name}: {status}; challenger v{r.challenger_version} at {r.share:g} % "
        f"(step {r.step_index + 1}/{len(r.steps)}) against champion v{r.champion_version}"
    )
    for e in r.events[-5:]:
        print(f"  {e.time.ToDatetime().strftime('%Y-%m-%d %H:%M:%S')}  {e.action}: {'; '.join(e.reasons)}")
    return 0
