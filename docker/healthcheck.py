"""Container health check over gRPC (``grpc.health.v1``): exit 0 when every checked target answers SERVING.

Used by docker-compose.yml. The Serve gRPC proxy routes a health check to an application by the metadata
``("application", name)``; a plain gRPC server (the pipeline API) answers without it::

    python docker/healthcheck.py 127.0.0.1:9000 --application omni --application llm
    python docker/healthcheck.py 127.0.0.1:50051

Exit status: 0 all SERVING, 1 any other answer or an RPC error (the reason goes to stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, applications: Sequence[str], service: str = "", timeout_s: float = 5.0) -> list[str]:
    """Ask ``target``'s health service about ``service`` once per application (once, without metadata, if none).

    Returns one line per problem; empty when every answer is SERVING.
    """
    problems = []
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for app in applications or [None]:
            metadata = (("application", app),) if app else ()
            where = f"{target} application {app}" if app else target
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata, timeout=timeout_s)
            except grpc.RpcError as exc:
                problems.append(f"{where}: {exc.code().name}: {exc.details()}")
                continue
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                problems.append(f"{where}: {status}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT of the gRPC server")
    parser.add_argument("--application", action="append", default=[], help="Serve application (repeatable)")
    parser.add_argument("--service", default="", help="health service name (default: the server as a whole)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    problems = check(args.target, args.application, args.service, args.timeout)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
