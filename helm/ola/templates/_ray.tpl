{{/* Volumes and mounts every Ray container shares: the model store (read-only) and a RAM-backed /dev/shm for
Ray's object store (the container default is 64 MiB). */}}
{{- define "ola.rayVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
{{- with .Values.modelStore.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ . | quote }}
    readOnly: true
{{- end }}
{{- end -}}
{{- define "ola.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.modelStore.existingClaim }}
- name: models
  mountPath: {{ .Values.modelStore.mountPath | quote }}
  readOnly: true
{{- end }}
{{- end -}}
