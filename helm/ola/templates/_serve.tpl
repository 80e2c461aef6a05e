{{/*
The RayService's serveConfigV2: the same document `ola serve --print-serve-config` writes for a platform config
(services/app.py serve_config_document), built from values. One application per service, built by
services.app:app_builder from its args ({service, <its section>, <the shared sections it reads>}); the deployment
options (replicas or autoscaling, concurrency, resources, the model versions as user_config) are overrides, so
changing them updates running replicas without rebuilding the application.
*/}}

{{/* [values key, Serve application name, deployment name, shared sections the replicas read] per service, in the
platform's order (services/app.py APP_NAMES, DEPLOYMENT_NAMES, _SHARED_SECTIONS). */}}
{{- define "ola.serveApps" -}}
- [vision, vision, VisionEncoder, [cache, object_store, limits, metrics]]
- [audio, audio, AudioEncoder, [cache, object_store, limits, metrics]]
- [llm, llm, LLM, [metrics]]
- [tts, tts, TTS, [metrics]]
- [gateway, omni, OmniGateway, [sessions, rollout, limits, proxy, metrics]]
{{- end -}}

{{/* What Serve's gRPC proxy routes (services/app.py SERVICER_FUNCTIONS). */}}
{{- define "ola.servicerFunctions" -}}
- services.app.add_vision_service
- services.app.add_audio_service
- services.app.add_llm_service
- services.app.add_tts_service
- services.app.add_omni_service
- services.app.add_health_service
{{- end -}}

{{/* The shared platform config sections, with the chart's wiring (Redis and S3 named by environment variable; the
rollout state in Redis only when canary routing is on). */}}
{{- define "ola.sharedSections" -}}
{{- $v := .Values -}}
{{- $proxy := dict "grpc_port" $v.proxy.grpcPort "http_port" $v.proxy.httpPort "http_host" "0.0.0.0" -}}
{{- if not (kindIs "invalid" $v.proxy.requestTimeoutS) -}}
{{- $_ := set $proxy "request_timeout_s" $v.proxy.requestTimeoutS -}}
{{- end -}}
{{- $objectStore := dict "endpoint_url_env" "OLA_S3_ENDPOINT_URL" "access_key_id_env" "AWS_ACCESS_KEY_ID" "secret_access_key_env" "AWS_SECRET_ACCESS_KEY" "region" $v.minio.region -}}
{{- $rollout := deepCopy $v.platform.rollout -}}
{{- if $rollout.model_name -}}
{{- $rollout = merge (dict "redis_url_env" "OLA_REDIS_URL") $rollout -}}
{{- end -}}
{{- $sections := dict
  "cache" (merge (dict "redis_url_env" "OLA_REDIS_URL") (deepCopy $v.platform.cache))
  "sessions" (merge (dict "redis_url_env" "OLA_REDIS_URL") (deepCopy $v.platform.sessions))
  "rollout" $rollout
  "object_store" $objectStore
  "limits" $v.platform.limits
  "proxy" $proxy
  "metrics" $v.platform.metrics
-}}
{{- toYaml $sections -}}
{{- end -}}

{{- define "ola.serveConfig" -}}
{{- $v := .Values -}}
{{- $shared := include "ola.sharedSections" . | fromYaml -}}
{{- $apps := list -}}
{{- range $entry := include "ola.serveApps" . | fromYamlArray -}}
{{- $service := index $entry 0 -}}
{{- $appName := index $entry 1 -}}
{{- $s := index $v.serve $service -}}
{{- $args := dict "service" $service $service (deepCopy (default (dict) $s.settings)) -}}
{{- range $section := index $entry 3 -}}
{{- $_ := set $args $section (index $shared $section) -}}
{{- end -}}
{{- $actor := dict "num_cpus" $s.numCpus "num_gpus" $s.numGpus -}}
{{- if $s.pool -}}
{{- $_ := set $actor "resources" (dict (printf "%s_pool" $s.pool) 1) -}}
{{- end -}}
{{- $deployment := dict "name" (index $entry 2) "max_ongoing_requests" $s.maxOngoingRequests "ray_actor_options" $actor "user_config" (dict "models" $v.models) -}}
{{- if $s.autoscaling.enabled -}}
{{- $_ := set $deployment "autoscaling_config" (dict "min_replicas" $s.autoscaling.minReplicas "max_replicas" $s.autoscaling.maxReplicas "target_ongoing_requests" $s.autoscaling.targetOngoingRequests) -}}
{{- else -}}
{{- $_ := set $deployment "num_replicas" $s.numReplicas -}}
{{- end -}}
{{- $app := dict "name" $appName "route_prefix" (printf "/%s" $appName) "import_path" "services.app:app_builder" "args" $args "deployments" (list $deployment) -}}
{{- $apps = append $apps $app -}}
{{- end -}}
{{- $grpc := dict "port" $v.proxy.grpcPort "grpc_servicer_functions" (include "ola.servicerFunctions" . | fromYamlArray) -}}
{{- if not (kindIs "invalid" $v.proxy.requestTimeoutS) -}}
{{- $_ := set $grpc "request_timeout_s" $v.proxy.requestTimeoutS -}}
{{- end -}}
{{- toYaml (dict "http_options" (dict "host" "0.0.0.0" "port" $v.proxy.httpPort) "grpc_options" $grpc "applications" $apps) -}}
{{- end -}}

{{/* rayStartParams.resources of a worker group: the custom pool resource in the quoting KubeRay passes to
`ray start --resources`, e.g. '"{\"vision_pool\": 1}"' (a JSON object with escaped quotes, in double quotes). */}}
{{- define "ola.poolResourcesParam" -}}
{{- $json := toJson (dict (printf "%s_pool" .name) .slots) -}}
{{- printf "\"%s\"" (replace "\"" "\\\"" $json) | squote -}}
{{- end -}}
