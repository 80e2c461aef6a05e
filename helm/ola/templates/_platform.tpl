{{/*
How the platform's containers find the stateful parts: URLs of the bundled or external services, and the
environment every platform container gets. Credentials only ever come from secretKeyRef; URLs that carry a password
reference it as $(VAR), which the kubelet expands, so no manifest holds one.
*/}}

{{/* OLA_REDIS_URL: redis[s]://[:$(OLA_REDIS_PASSWORD)@]host:port/db */}}
{{- define "ola.redisUrl" -}}
{{- $r := .Values.redis -}}
{{- $scheme := ternary "rediss" "redis" (and (not $r.enabled) $r.external.tls) -}}
{{- $auth := ternary ":$(OLA_REDIS_PASSWORD)@" "" (not (empty $r.existingSecret)) -}}
{{- $host := ternary (printf "%s-redis:6379" (include "ola.fullname" .)) (printf "%s:%v" $r.external.host $r.external.port) $r.enabled -}}
{{- printf "%s://%s%s/%v" $scheme $auth $host $r.db -}}
{{- end -}}

{{/* The S3 endpoint (bundled MinIO or minio.external.url); empty: AWS S3. */}}
{{- define "ola.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "http://%s-minio:9000" (include "ola.fullname" .) -}}
{{- else -}}
{{- .Values.minio.external.url -}}
{{- end -}}
{{- end -}}

{{/* MLFLOW_TRACKING_URI: the bundled server's Service or mlflow.external.url. */}}
{{- define "ola.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow:%v" (include "ola.fullname" .) .Values.mlflow.port -}}
{{- else -}}
{{- .Values.mlflow.external.url -}}
{{- end -}}
{{- end -}}

{{/* host:port of PostgreSQL (bundled or external). */}}
{{- define "ola.postgresHost" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "%s-postgresql:5432" (include "ola.fullname" .) -}}
{{- else -}}
{{- printf "%s:%v" .Values.postgresql.external.host .Values.postgresql.external.port -}}
{{- end -}}
{{- end -}}

{{/* The S3 access key pair as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (nothing without minio.existingSecret). */}}
{{- define "ola.s3CredentialsEnv" -}}
{{- with .Values.minio }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .secretAccessKeyKey | quote }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- end -}}

{{/*
The environment of every platform container (Ray head and workers, pipeline API): what services/serve_config.py
and workflows/ read.
  OLA_REDIS_URL           cache, sessions, API keys, run state (password from redis.existingSecret)
  OLA_S3_ENDPOINT_URL     s3:// media (absent for AWS S3)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
  MLFLOW_TRACKING_URI     the tracking server (and MLFLOW_TRACKING_USERNAME / _PASSWORD for an external one)
  MLFLOW_S3_ENDPOINT_URL  where MLflow clients read artifacts directly (absent for AWS S3)
*/}}
{{- define "ola.platformEnv" -}}
{{- if .Values.redis.existingSecret }}
- name: OLA_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret | quote }}
      key: {{ .Values.redis.passwordKey | quote }}
{{- end }}
- name: OLA_REDIS_URL
  value: {{ include "ola.redisUrl" . | quote }}
{{- with include "ola.s3Endpoint" . }}
- name: OLA_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- include "ola.s3CredentialsEnv" . }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "ola.mlflowUri" . | quote }}
{{- with .Values.mlflow.external }}
{{- if and (not $.Values.mlflow.enabled) .existingSecret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .usernameKey | quote }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .passwordKey | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Checks that values.schema.json cannot express; each failure names the value and what to do.
*/}}
{{- define "ola.validate" -}}
{{- $v := .Values -}}
{{- if and $v.redis.enabled (not $v.redis.existingSecret) -}}
{{- fail "redis.existingSecret is required for the bundled Redis: create a Secret with its password (kubectl create secret generic ola-redis --from-literal=redis-password=$(openssl rand -hex 24)) and set redis.existingSecret=ola-redis (key: redis.passwordKey)" -}}
{{- end -}}
{{- if and (not $v.redis.enabled) (not $v.redis.external.host) -}}
{{- fail "redis.external.host is required when redis.enabled is false" -}}
{{- end -}}
{{- if and $v.minio.enabled (not $v.minio.existingSecret) -}}
{{- fail "minio.existingSecret is required for the bundled MinIO: create a Secret with the root user and password (kubectl create secret generic ola-s3 --from-literal=access-key-id=ola --from-literal=secret-access-key=$(openssl rand -hex 24)) and set minio.existingSecret=ola-s3" -}}
{{- end -}}
{{- if $v.mlflow.enabled -}}
{{- if not $v.postgresql.existingSecret -}}
{{- fail "postgresql.existingSecret is required for the bundled MLflow (its database password): kubectl create secret generic ola-postgresql --from-literal=postgres-password=$(openssl rand -hex 24), then set postgresql.existingSecret=ola-postgresql" -}}
{{- end -}}
{{- if and (not $v.postgresql.enabled) (not $v.postgresql.external.host) -}}
{{- fail "postgresql.external.host is required when the bundled MLflow runs and postgresql.enabled is false" -}}
{{- end -}}
{{- else if not $v.mlflow.external.url -}}
{{- fail "mlflow.external.url is required when mlflow.enabled is false" -}}
{{- end -}}
{{- if and $v.postgresql.enabled (not $v.postgresql.existingSecret) -}}
{{- fail "postgresql.existingSecret is required for the bundled PostgreSQL (see postgresql.passwordKey)" -}}
{{- end -}}
{{- if not (hasKey $v.models.versions $v.models.default_version) -}}
{{- fail (printf "models.default_version %q is not one of models.versions (%s)" $v.models.default_version (keys $v.models.versions | sortAlpha | join ", ")) -}}
{{- end -}}
{{- range $name, $s := $v.serve -}}
{{- if $s.pool -}}
{{- $g := index $v.workerGroups $s.pool -}}
{{- if not $g -}}
{{- fail (printf "serve.%s.pool %q is not a worker group (workerGroups: %s)" $name $s.pool (keys $v.workerGroups | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if gt (float64 $s.numGpus) (float64 $g.gpus) -}}
{{- fail (printf "serve.%s.numGpus (%v) is more than a pod of workerGroups.%s has (gpus: %v)" $name $s.numGpus $s.pool $g.gpus) -}}
{{- end -}}
{{- if lt (float64 $g.slots) 1.0 -}}
{{- fail (printf "workerGroups.%s.slots must be at least 1: serve.%s runs on it" $s.pool $name) -}}
{{- end -}}
{{- end -}}
{{- if and $s.autoscaling.enabled (gt (float64 $s.autoscaling.minReplicas) (float64 $s.autoscaling.maxReplicas)) -}}
{{- fail (printf "serve.%s.autoscaling.minReplicas (%v) is over maxReplicas (%v)" $name $s.autoscaling.minReplicas $s.autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- range $name, $g := $v.workerGroups -}}
{{- if or (gt (float64 $g.minReplicas) (float64 $g.replicas)) (gt (float64 $g.replicas) (float64 $g.maxReplicas)) -}}
{{- fail (printf "workerGroups.%s: replicas (%v) must be within [minReplicas, maxReplicas] = [%v, %v]" $name $g.replicas $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
