"""``ola serve`` and ``ola chat``: run the platform on a local Ray, and talk to it.

Registered into the ``ola`` command through the ``ola.cli`` entry-point group (``register(subparsers)``); also
runnable as ``python -m services.cli serve|chat ...``.

    ola serve [--config services/configs/local.yaml] [--port 9000] [--checkpoint DIR]
    ola chat --target 127.0.0.1:9000 [--image P] [--video P] [--audio P] [--speak OUT.wav] [--session ID] "question"

``ola serve`` starts a local Ray (its own session; ``--ray-address`` joins a running cluster instead), deploys the five
applications with the config (the embedded default: tiny preset on CPU, no Redis), waits until the gRPC proxy routes
them all and each reports SERVING, prints ``ready at HOST:PORT`` and stays in the foreground. Ctrl-C / SIGTERM
shuts Serve and Ray down and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

_CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``chat`` to the ``ola`` command."""
    p = subparsers.add_parser("serve", help="run the platform's gRPC services on a local Ray Serve (foreground)")
    p.add_argument("--config", type=Path, default=None, help="a platform YAML (default: services/configs/local.yaml)")
    p.add_argument("--port", type=int, default=None, help="gRPC proxy port (default: the config's, 9000)")
    p.add_argument("--http-port", type=int, default=None, help="Serve's HTTP proxy port (default: the config's)")
    p.add_argument("--checkpoint", type=Path, default=None, help="serve this checkpoint directory as the only version")
    p.add_argument("--version-name", default="local", help="model version name of --checkpoint (default: local)")
    p.add_argument("--ray-address", default=None, help="join a running Ray cluster instead of starting one")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--ray-temp-dir", default=None, help="temp/log directory of the local Ray session")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every app (default 300)")
    p.add_argument(
        "--print-serve-config",
        action="store_true",
        help="print the config as a Serve config file (serve deploy, KubeRay serveConfigV2) and exit",
    )
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("chat", help="ask the platform a question through its gRPC proxy; stream the answer")
    p.add_argument("--target", default="127.0.0.1:9000", help="HOST:PORT of the gRPC proxy (default 127.0.0.1:9000)")
    p.add_argument("--application", default="omni", help="the gateway's Serve application (default omni)")
    p.add_argument("--image", type=Path, action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--video", type=Path, help="a video file (its audio track is used too)")
    p.add_argument("--audio", type=Path, help="an audio file")
    p.add_argument("--spoken-question", action="store_true", help="the audio is the question about the image/video")
    p.add_argument("--max-frames", type=int, default=0, help="video frames to sample (default: the server's limit)")
    p.add_argument("--speak", type=Path, metavar="OUT.wav", help="also ask for speech and write it to this WAV")
    p.add_argument("--voice", default="", help="TTS voice (default: the server's; auto picks by script)")
    p.add_argument("--sample-rate", type=int, default=0, help="speech sample rate in Hz (default: the server's)")
    p.add_argument("--session", default="", help="continue this session (its id is printed to stderr)")
    p.add_argument("--model-version", default="", help="model version (default: the session's / the server's)")
    p.add_argument("--system-prompt", default="", help="system prompt of a new session")
    g = p.add_argument_group("sampling (unset: the server's defaults, Ola's infer.py)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of the call in seconds (default 300)")
    p.add_argument("question", nargs="?", default="", help="the question (may be empty with --spoken-question)")
    p.set_defaults(func=cmd_chat)


# ------------------------------------------------------------------------------------------------ serve
def _local_resources(config: Any) -> dict[str, float]:
    """Custom resources a local cluster declares so every replica of ``config`` can be placed (pools simulated)."""
    totals: dict[str, float] = {}
    for name in ("vision", "audio", "llm", "tts", "gateway"):
        spec = config.service(name)
        replicas = spec.autoscaling.max_replicas if spec.autoscaling else (spec.num_replicas or 1)
        for resource, amount in spec.ray_actor_options.resources.items():
            totals[resource] = totals.get(resource, 0.0) + amount * replicas
    return totals


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster for one user (Ray 2.60 enables tokens)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.serve_config import ConfigError, load_config

    try:
        config = load_config(args.config)
        if args.checkpoint is not None:
            if not args.checkpoint.is_dir():
                raise ConfigError(f"--checkpoint {args.checkpoint}: not a directory")
            config = config.with_checkpoint(args.checkpoint, args.version_name)
        proxy = config.proxy.model_dump()
        if args.port is not None:
            proxy["grpc_port"] = args.port
        if args.http_port is not None:
            proxy["http_port"] = args.http_port
        config = type(config).from_mapping({**config.to_plain(), "proxy": proxy}, "command line")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_serve_config:
        import yaml

        from services.app import serve_config_document

        yaml.safe_dump(serve_config_document(config), sys.stdout, sort_keys=False)
        return 0

    import ray
    from ray import serve

    from services import app
    from services.client import OlaClient

    stop = threading.Event()
    init: dict[str, Any] = {"include_dashboard": False, "namespace": "ola"}
    if args.ray_address:
        init["address"] = args.ray_address
    else:
        init.update(address="local", num_cpus=args.num_cpus, resources=_local_resources(config) or None)
        if args.ray_temp_dir:
            init["_temp_dir"] = str(Path(args.ray_temp_dir).resolve())
    ray.init(**init)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    address = f"127.0.0.1:{config.proxy.grpc_port}"
    status = 0
    try:
        print(f"ola serve: deploying {', '.join(app.APP_NAMES.values())} (gRPC proxy on port {config.proxy.grpc_port})")
        sys.stdout.flush()
        app.deploy(config)
        with OlaClient(address) as client:
            deadline = time.monotonic() + args.ready_timeout
            while not stop.is_set():
                try:
                    client.wait_ready(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                    break
                except TimeoutError as exc:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{exc}; check the replicas' resources with `ray status`") from None
        if not stop.is_set():
            names = ", ".join(app.APP_NAMES.values())
            print(f"ola serve: ready at {address} (applications: {names}); Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            pass
        print("ola serve: shutting down", file=sys.stderr, flush=True)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


# ------------------------------------------------------------------------------------------------ chat
def _usage_line(usage: Any) -> str:
    p = usage.prompt_tokens
    t = usage.timings
    parts = [
        f"prompt {p.total} tokens (text {p.text}, image {p.image}, video {p.video}, audio {p.audio})",
        f"completion {usage.completion_tokens}",
    ]
    if t.HasField("time_to_first_token"):
        parts.append(f"first token {t.time_to_first_token.ToNanoseconds() / 1e9:.2f} s")
    if t.HasField("total"):
        parts.append(f"total {t.total.ToNanoseconds() / 1e9:.2f} s")
    if usage.audio_output_seconds:
        parts.append(f"speech {usage.audio_output_seconds:.1f} s")
    return "usage: " + ", ".join(parts)


def cmd_chat(args: argparse.Namespace) -> int:
    from services.client import ChatResult, OlaClient, OlaError, sampling

    params = sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    result = ChatResult()
    parts: list[str] = []
    try:
        with OlaClient(args.target, application=args.application, timeout=args.timeout) as client:
            events = client.chat(
                args.question,
                images=args.image,
                video=args.video,
                audio=args.audio,
                session_id=args.session,
                speak=args.speak is not None,
                sampling=params if params.ListFields() else None,
                voice=args.voice,
                sample_rate_hz=args.sample_rate,
                model_version=args.model_version,
                system_prompt=args.system_prompt,
                spoken_question=args.spoken_question,
                max_video_frames=args.max_frames,
            )
            for event in events:
                kind = event.WhichOneof("event")
                if kind == "started":
                    result.session_id = event.started.session_id
                    result.model_version = event.started.model_version
                elif kind == "text_delta":
                    parts.append(event.text_delta.text)
                    sys.stdout.write(event.text_delta.text)
                    sys.stdout.flush()
                elif kind == "audio_chunk":
                    result.speech.add(event.audio_chunk)
                elif kind == "warning":
                    print(f"\nwarning: {event.warning.detail.message}", file=sys.stderr)
                elif kind == "usage":
                    result.usage = event.usage
    except OSError as exc:  # a media file that cannot be read
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OlaError as exc:
        if parts:
            sys.stdout.write("\n")
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.code in _CALLER_ERRORS else 1
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"session {result.session_id}, model version {result.model_version}", file=sys.stderr)
    if result.usage is not None:
        print(_usage_line(result.usage), file=sys.stderr)
    if args.speak is not None:
        speech = result.speech
        if not speech.pcm16:
            print("warning: the answer has no speech; no WAV written", file=sys.stderr)
            return 1
        speech.write_wav(args.speak)
        print(
            f"speech: {len(speech.sentences)} sentences, {speech.duration_s:.1f} s at {speech.sample_rate_hz} Hz "
            f"-> {args.speak}",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------------------------------------ standalone
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.cli serve|chat ...`` (the same commands as ``ola serve`` / ``ola chat``)."""
    parser = argparse.ArgumentParser(prog="ola", description="Ola platform services")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
