{{- define "virtbackup.secretName" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecret }}{{ else }}{{ .Release.Name }}-virtbackup{{ end -}}
{{- end -}}

{{- define "virtbackup.vaultSecretName" -}}
{{- if .Values.vault.existingSecret }}{{ .Values.vault.existingSecret }}{{ else }}{{ .Release.Name }}-vault{{ end -}}
{{- end -}}

{{- define "virtbackup.natsSecretName" -}}
{{- if .Values.nats.credentials.existingSecret }}{{ .Values.nats.credentials.existingSecret }}{{ else }}{{ .Release.Name }}-nats{{ end -}}
{{- end -}}
