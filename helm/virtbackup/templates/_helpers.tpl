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

{{- /* Checks across values that values.schema.json cannot express: a clear message
       rather than a release that renders but does not run. Included by config.yaml. */ -}}
{{- define "virtbackup.checks" -}}
{{- $n := .Values.nats -}}
{{- if and $n.bundled.enabled (gt (int $n.streamReplicas) (int $n.bundled.replicas)) -}}
{{- fail (printf "nats.streamReplicas (%v) is more than the bundled cluster's nats.bundled.replicas (%v)" $n.streamReplicas $n.bundled.replicas) -}}
{{- end -}}
{{- $k := .Values.autoscaling.keda -}}
{{- if $k.enabled -}}
{{- if and (not $n.bundled.enabled) (not $k.monitoringEndpoint) -}}
{{- fail "autoscaling.keda.monitoringEndpoint: set it (host:port of your NATS cluster's monitoring) when nats.bundled.enabled is false" -}}
{{- end -}}
{{- if gt (int $k.minReplicaCount) (int $k.maxReplicaCount) -}}
{{- fail (printf "autoscaling.keda.minReplicaCount (%v) is more than maxReplicaCount (%v)" $k.minReplicaCount $k.maxReplicaCount) -}}
{{- end -}}
{{- end -}}
{{- $ports := splitList "-" .Values.instantAccess.ports -}}
{{- if or (gt (int (last $ports)) 65535) (gt (int (first $ports)) (int (last $ports))) -}}
{{- fail (printf "instantAccess.ports: %q is not a port range FIRST-LAST within 1-65535" .Values.instantAccess.ports) -}}
{{- end -}}
{{- end -}}
