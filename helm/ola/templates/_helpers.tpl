{{/*
Names and labels. Every resource is named "<fullname>-<component>" (the RayService is "<fullname>") and carries the
standard app.kubernetes.io labels plus app.kubernetes.io/component.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "ola.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<name>" (just the release name when it already contains the name), or fullnameOverride. Kept short:
KubeRay derives RayCluster, pod and Service names from it. */}}
{{- define "ola.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "ola.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select this release's pods. */}}
{{- define "ola.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ola.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "ola.labels" -}}
helm.sh/chart: {{ include "ola.chart" . }}
{{ include "ola.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ola
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "redis"). */}}
{{- define "ola.componentSelectorLabels" -}}
{{ include "ola.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's resources: (dict "ctx" $ "component" "redis"). */}}
{{- define "ola.componentLabels" -}}
{{ include "ola.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The platform image reference. */}}
{{- define "ola.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* imagePullSecrets of a pod spec, at the indentation of the spec's keys: (dict "ctx" $ "indent" 6). */}}
{{- define "ola.imagePullSecrets" -}}
{{- with .ctx.Values.imagePullSecrets }}
{{- $list := list }}
{{- range . }}{{ $list = append $list (dict "name" .) }}{{ end }}
{{- dict "imagePullSecrets" $list | toYaml | nindent $.indent }}
{{- end }}
{{- end -}}

{{/* A {cpu, memory} pair as container resources (requests = limits), plus extra limits: (dict "r" ... "gpus" N). */}}
{{- define "ola.resources" -}}
requests:
  cpu: {{ .r.cpu | quote }}
  memory: {{ .r.memory | quote }}
limits:
  cpu: {{ .r.cpu | quote }}
  memory: {{ .r.memory | quote }}
{{- if .gpus }}
  nvidia.com/gpu: {{ .gpus | quote }}
{{- end }}
{{- end -}}

{{/* The data volume of a bundled stateful component: a volumeClaimTemplates entry, or (persistence off) nothing
here and an emptyDir in the pod (ola.dataVolume). Called with (dict "ctx" $ "p" .Values.x.persistence). */}}
{{- define "ola.volumeClaimTemplates" -}}
{{- if .p.enabled }}
volumeClaimTemplates:
  - metadata:
      name: data
    spec:
      accessModes: ["ReadWriteOnce"]
      {{- with .p.storageClass }}
      storageClassName: {{ . | quote }}
      {{- end }}
      resources:
        requests:
          storage: {{ .p.size | quote }}
{{- end }}
{{- end -}}

{{- define "ola.dataVolume" -}}
{{- if not .p.enabled }}
volumes:
  - name: data
    emptyDir: {}
{{- end }}
{{- end -}}
