"""The platform's control-plane API: PipelineService (training runs as jobs) and ModelService (registry, promotion,
rollout) over gRPC, with API-key authentication.

- :mod:`workflows.api.auth`: API keys (hashed in Redis), roles ``read < trigger < admin``, the server interceptor;
- :mod:`workflows.api.jobs`: the job backends a run is submitted to (Ray Jobs, or a local process);
- :mod:`workflows.api.runs`: the durable run store in Redis and the monitor that keeps runs in step with their jobs;
- :mod:`workflows.api.pipeline_service`, :mod:`workflows.api.model_service`: the servicers;
- :mod:`workflows.api.server`: the grpc.aio server (both services, health, reflection);
- :mod:`workflows.api.cli`: ``ola api serve``, ``ola apikey``, ``ola models``, ``ola rollout``, and
  ``ola pipeline start|get|list|watch|cancel``.
"""
