{{- define "virtbackup.secretName" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecret }}{{ else }}{{ .Release.Name }}-virtbackup{{ end -}}
{{- end -}}

{{- define "virtbackup.vaultSecretName" -}}
{{- if .Values.vault.existingSecret }}{{ .Values.vault.existingSecret }}{{ else }}{{ .Release.Name }}-vault{{ end -}}
{{- end -}}

{{- define "virtbackup.natsSecretName" -}}
{{- if .Values.nats.credentials.existingSecret }}{{ .Values.nats.credentials.existingSecret }}{{ else }}{{ .Release.Name }}-nats{{ end -}}
{{- end -}}

{{- /* The NATS URL: the bundled cluster's Service, or nats.url (an existing cluster). */ -}}
{{- define "virtbackup.natsUrl" -}}
{{- if .Values.nats.bundled.enabled }}nats://{{ .Release.Name }}-nats:4222{{ else }}{{ .Values.nats.url }}{{ end -}}
{{- end -}}

{{- define "virtbackup.streamReplicas" -}}
{{- if .Values.nats.streamReplicas }}{{ .Values.nats.streamReplicas }}{{ else if .Values.nats.bundled.enabled }}{{ min 3 .Values.nats.bundled.replicas }}{{ else }}1{{ end -}}
{{- end -}}
