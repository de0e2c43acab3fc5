{{/* The chart's name, or nameOverride. */}}
{{- define "conntrack-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: RELEASE-NAME, or RELEASE when it already contains NAME. */}}
{{- define "conntrack-exporter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "conntrack-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels the DaemonSet selects its pods by; the monitors and the Service select them too. */}}
{{- define "conntrack-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conntrack-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conntrack-exporter.labels" -}}
helm.sh/chart: {{ include "conntrack-exporter.chart" . }}
{{ include "conntrack-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: metrics
app.kubernetes.io/part-of: conntrack-exporter
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "conntrack-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "conntrack-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "conntrack-exporter.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* netlink (CAP_NET_ADMIN) or procfs (unprivileged): what NOTES.txt reports. */}}
{{- define "conntrack-exporter.mode" -}}
{{- if .Values.unprivileged }}unprivileged (procfs){{ else }}netlink (CAP_NET_ADMIN){{ end }}
{{- end }}

{{/*
Where the volumes are mounted: side by side under /etc/conntrack-exporter, never one inside
another (a mount point inside a read-only ConfigMap or Secret volume leans on the kubelet
creating it).
*/}}
{{- define "conntrack-exporter.configDir" -}}
/etc/conntrack-exporter/config
{{- end }}

{{/*
The relabelings of a ServiceMonitor endpoint or a PodMonitor podMetricsEndpoint: the node label
first, then the user's. Argument: serviceMonitor or podMonitor values.
*/}}
{{- define "conntrack-exporter.relabelings" -}}
{{- $relabelings := list }}
{{- if .attachNodeLabel }}
{{- $relabelings = append $relabelings (dict "sourceLabels" (list "__meta_kubernetes_pod_node_name") "targetLabel" "node" "action" "replace") }}
{{- end }}
{{- $relabelings = concat $relabelings .relabelings }}
{{- if $relabelings }}
relabelings:
  {{- toYaml $relabelings | nindent 2 }}
{{- end }}
{{- with .metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
