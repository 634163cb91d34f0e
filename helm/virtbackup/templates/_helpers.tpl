{{- define "virtbackup.secretName" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecret }}{{ else }}{{ .Release.Name }}-virtbackup{{ end -}}
{{- end -}}
