"""Prometheus metrics of the model services, and an HTTP exporter.

One :class:`ServiceMetrics` per ``CollectorRegistry`` (:func:`get_metrics`), shared by every servicer of the process
and told apart by the ``service`` label (``vision``, ``audio``, ``llm``, ``gateway``), so several servicers in one
process (tests, a single-replica app) never register a metric twice. The default registry is this module's own
:data:`REGISTRY` rather than prometheus_client's global one, so nothing else in the process (Ray, libraries) mixes
into the scrape.

Names (all prefixed ``ola_``):

- ``requests_total{service, method, code}`` and ``request_errors_total{service, method, code}``;
- ``request_latency_seconds{service, method}``: whole RPCs (a stream: until its last message);
- ``time_to_first_token_seconds{service, model_version}``, ``time_to_first_audio_seconds{service, model_version}``;
- ``llm_batch_size{model_version}``: requests decoding together, observed once per engine step;
  ``llm_running_requests{model_version}`` and ``llm_waiting_requests{model_version}``: after the latest step;
- ``encoder_cache_lookups_total{service, kind, result}`` with result ``hit`` / ``miss``;
- ``encode_seconds{service, kind}``: encoder + projector time of the computed (not cached) items.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)  # the services' own registry (one per process)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class ServiceMetrics:
    """The metric families of one registry. Use :func:`get_metrics`, which builds each registry's set once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "ola_requests", "RPCs finished, by status code.", ["service", "method", "code"], registry=registry
        )
        self.errors = Counter(
            "ola_request_errors",
            "RPCs that ended with a non-OK status.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "ola_request_latency_seconds",
            "Duration of whole RPCs (streams until their last message).",
            ["service", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "ola_time_to_first_token_seconds",
            "From the start of a request to its first generated token.",
            ["service", "model_version"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_audio = Histogram(
            "ola_time_to_first_audio_seconds",
            "From the start of a request to its first synthesized audio chunk.",
            ["service", "model_version"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "ola_llm_batch_size",
            "Requests decoding together, observed once per engine step.",
            ["model_version"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.running = Gauge(
            "ola_llm_running_requests", "Requests in the running batch.", ["model_version"], registry=registry
        )
        self.waiting = Gauge(
            "ola_llm_waiting_requests", "Requests queued for the running batch.", ["model_version"], registry=registry
        )
        self.cache_lookups = Counter(
            "ola_encoder_cache_lookups",
            "Encoder cache lookups by result (hit / miss).",
            ["service", "kind", "result"],
            registry=registry,
        )
        self.encode_seconds = Histogram(
            "ola_encode_seconds",
            "Encoder + projector time of items that were computed (not served from the cache).",
            ["service", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    # ------------------------------------------------------------------------------------------------ helpers
    def observe_rpc(self, service: str, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC (``code``: a ``grpc.StatusCode`` name such as ``OK``) and its duration."""
        self.requests.labels(service, method, code).inc()
        if code != "OK":
            self.errors.labels(service, method, code).inc()
        self.latency.labels(service, method).observe(seconds)

    def observe_chat(self, model_version: str, marks: dict[str, float]) -> None:
        """The gateway's per-chat latencies: seconds from the request to its first text and first audio."""
        if "first_token" in marks:
            self.time_to_first_token.labels("omni", model_version).observe(marks["first_token"])
        if "first_audio" in marks:
            self.time_to_first_audio.labels("omni", model_version).observe(marks["first_audio"])

    def cache_lookup(self, service: str, kind: str, hit: bool) -> None:
        self.cache_lookups.labels(service, kind, "hit" if hit else "miss").inc()

    def engine_step(self, model_version: str, batch_size: int, running: int, waiting: int) -> None:
        self.batch_size.labels(model_version).observe(batch_size)
        self.running.labels(model_version).set(running)
        self.waiting.labels(model_version).set(waiting)

    def sample_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one sample (for example ``ola_requests_total``), 0.0 if absent. For tests."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


_BY_REGISTRY: dict[int, ServiceMetrics] = {}
_LOCK = threading.Lock()


def get_metrics(registry: CollectorRegistry | None = None) -> ServiceMetrics:
    """The metrics of ``registry`` (default :data:`REGISTRY`), created on first use."""
    registry = REGISTRY if registry is None else registry
    with _LOCK:
        metrics = _BY_REGISTRY.get(id(registry))
        if metrics is None or metrics.registry is not registry:
            metrics = _BY_REGISTRY[id(registry)] = ServiceMetrics(registry)
        return metrics


def start_exporter(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None) -> tuple[Any, Any]:
    """Serve ``registry`` (default :data:`REGISTRY`) at ``http://addr:port/metrics`` from a daemon thread.

    Returns:
        prometheus_client's (server, thread); ``server.shutdown()`` stops it. Port 0 picks a free port
        (``server.server_port``).
    """
    server, thread = start_http_server(port, addr=addr, registry=REGISTRY if registry is None else registry)
    log.info("metrics exporter on %s:%d", addr, server.server_port)
    return server, thread
