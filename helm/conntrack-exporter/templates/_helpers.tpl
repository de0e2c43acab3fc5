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

{{/* The chart's own labels: no value overrides them (the selector labels among them). */}}
{{- define "conntrack-exporter.ownLabels" -}}
helm.sh/chart: {{ include "conntrack-exporter.chart" . }}
{{ include "conntrack-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: metrics
app.kubernetes.io/part-of: conntrack-exporter
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Every object's labels: commonLabels, and the chart's own over them. */}}
{{- define "conntrack-exporter.labels" -}}
{{- include "conntrack-exporter.labelsWith" (list . dict) }}
{{- end }}

{{/*
An object's labels when a value gives it some of its own (podLabels, service.labels, a
monitor's labels...): the chart's own labels, then that value's, then commonLabels. Argument:
(list $ the object's labels).
*/}}
{{- define "conntrack-exporter.labelsWith" -}}
{{- $root := index . 0 }}
{{- $own := include "conntrack-exporter.ownLabels" $root | fromYaml }}
{{- toYaml (merge $own (deepCopy (index . 1 | default dict)) (deepCopy ($root.Values.commonLabels | default dict))) }}
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

{{/*
The collectors that cannot work in the mode rendered, each with why, as YAML: the chart turns
them off (--no-collector.NAME) rather than let them report
conntrack_exporter_collector_success 0 on every node, which ConntrackExporterCollectorFailed
would page on. Unprivileged (user 65534, no capability) ctnetlink refuses the table dump:
conntrack_table needs CAP_NET_ADMIN, which a non-root process cannot hold under
allowPrivilegeEscalation: false. Fails when config or extraArgs turn one of them on.
*/}}
{{- define "conntrack-exporter.collectorsOff" -}}
{{- $off := dict }}
{{- if .Values.unprivileged }}
{{- $_ := set $off "conntrack_table" "CAP_NET_ADMIN" }}
{{- end }}
{{- range $name, $needs := $off }}
{{- if dig "collectors" $name "enabled" false ($.Values.config | default dict) }}
{{- fail (printf "config.collectors.%s.enabled is true, but unprivileged: true leaves the exporter without %s, which the %s collector needs: remove it, or set unprivileged: false" $name $needs $name) }}
{{- end }}
{{- if has (printf "--collector.%s" $name) $.Values.extraArgs }}
{{- fail (printf "extraArgs has --collector.%s, but unprivileged: true leaves the exporter without %s, which the %s collector needs: remove it, or set unprivileged: false" $name $needs $name) }}
{{- end }}
{{- end }}
{{- toYaml $off }}
{{- end }}

{{/*
The exporter container's security context, as YAML. The mode's: no privilege, no escalation, a
read-only root file system, the runtime's seccomp profile; root with CAP_NET_ADMIN alone, or
(unprivileged) user 65534 with no capability. Then each key securityContext gives, in place of
the mode's: the schema admits only those that cannot widen it (another non-root user or group,
a seccomp, AppArmor or SELinux setting no looser than the runtime's, the three flags restated).
Another user fails in the default mode: a capability added in the security context reaches a
non-root process only through file capabilities, which allowPrivilegeEscalation: false
disables, so only root keeps CAP_NET_ADMIN there.
*/}}
{{- define "conntrack-exporter.securityContext" -}}
{{- $given := .Values.securityContext | default dict }}
{{- $context := dict "privileged" false "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- if .Values.unprivileged }}
{{- $_ := set $context "runAsNonRoot" true }}
{{- $_ := set $context "runAsUser" 65534 }}
{{- $_ := set $context "runAsGroup" 65534 }}
{{- $_ := set $context "capabilities" (dict "drop" (list "ALL")) }}
{{- else }}
{{- if hasKey $given "runAsUser" }}
{{- fail "securityContext.runAsUser: the default mode runs as root, the one user that keeps CAP_NET_ADMIN here; set unprivileged: true to run as another user" }}
{{- end }}
{{- $_ := set $context "runAsNonRoot" false }}
{{- $_ := set $context "runAsUser" 0 }}
{{- $_ := set $context "capabilities" (dict "drop" (list "ALL") "add" (list "NET_ADMIN")) }}
{{- end }}
{{- range $key, $value := $given }}
{{- $_ := set $context $key (deepCopy $value) }}
{{- end }}
{{- toYaml $context }}
{{- end }}

{{/* netlink (CAP_NET_ADMIN) or procfs (unprivileged): what NOTES.txt reports. */}}
{{- define "conntrack-exporter.mode" -}}
{{- if .Values.unprivileged }}unprivileged (procfs){{ else }}netlink (CAP_NET_ADMIN){{ end }}
{{- end }}

{{/*
The pods collector, as YAML: enabled (the flags and the hostPath mounts are rendered) and
recursiveReadOnly (the mounts' value, empty for none). Off, whatever pods.enabled says, as root
on a Kubernetes older than 1.31 (NOTES.txt says so).

Its mounts are read-only; recursiveReadOnly makes them so beneath too (submounts of the host's
/proc such as /proc/sys/fs/binfmt_misc, whose register file the root user may write without any
capability). Kubernetes has the field from 1.30 and turns it on by default from 1.31. As root
(the default mode) the host's /proc is mounted only there, with Enabled: a runtime that cannot
do it fails the pod rather than mount it writable beneath. As user 65534 (unprivileged) no
root-owned file is writable anyway: IfPossible, where the field exists.
*/}}
{{- define "conntrack-exporter.pods" -}}
{{- $recursive := semverCompare ">=1.31-0" .Capabilities.KubeVersion.Version }}
{{- if not .Values.pods.enabled }}
enabled: false
{{- else if .Values.unprivileged }}
enabled: true
recursiveReadOnly: {{ ternary "IfPossible" "" $recursive | quote }}
{{- else if $recursive }}
enabled: true
recursiveReadOnly: Enabled
{{- else }}
enabled: false
{{- end }}
{{- end }}

{{/* Where the host's /proc is mounted, and passed as --path.procfs. */}}
{{- define "conntrack-exporter.hostProcDir" -}}
/host/proc
{{- end }}

{{/* Where the kubelet's pod log directory is mounted: the pods collector's default. */}}
{{- define "conntrack-exporter.podLogsDir" -}}
/var/log/pods
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
The target labels prometheus-operator gives every target from the exporter's own pod and Service
(namespace, pod, container, service, endpoint), which the monitors drop: with honorLabels a
pod's series keep the namespace and pod they carry, and the host's series, which carry none,
would otherwise get the exporter pod's.
*/}}
{{- define "conntrack-exporter.exporterTargetLabels" -}}
namespace|pod|container|service|endpoint
{{- end }}

{{/*
The relabelings of a ServiceMonitor endpoint or a PodMonitor podMetricsEndpoint (which run
after the operator's own): the node label, the exporter's own target labels dropped, then the
user's (the __meta_kubernetes_* labels are still there for them). A labeldrop here, on the
target, not in metricRelabelings: there the exporter's labels would already have been merged
into the series, and a pod's own namespace and pod would be dropped with them. Argument:
serviceMonitor or podMonitor values.
*/}}
{{- define "conntrack-exporter.relabelings" -}}
{{- $relabelings := list }}
{{- if .attachNodeLabel }}
{{- $relabelings = append $relabelings (dict "sourceLabels" (list "__meta_kubernetes_pod_node_name") "targetLabel" "node" "action" "replace") }}
{{- end }}
{{- $relabelings = append $relabelings (dict "action" "labeldrop" "regex" (include "conntrack-exporter.exporterTargetLabels" .)) }}
{{- $relabelings = concat $relabelings .relabelings }}
relabelings:
  {{- toYaml $relabelings | nindent 2 }}
{{- with .metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "conntrack-exporter.webDir" -}}
/etc/conntrack-exporter/web
{{- end }}

{{- define "conntrack-exporter.tlsDir" -}}
/etc/conntrack-exporter/tls
{{- end }}

{{/* The web configuration file, as --web.config.file names it. */}}
{{- define "conntrack-exporter.webConfigFile" -}}
{{- printf "%s/web-config.yml" (include "conntrack-exporter.webDir" .) }}
{{- end }}

{{/* The Secret holding the web configuration file: the chart's, or webConfig.existingSecret. */}}
{{- define "conntrack-exporter.webConfigSecret" -}}
{{- .Values.webConfig.existingSecret | default (printf "%s-web-config" (include "conntrack-exporter.fullname" .)) }}
{{- end }}

{{/*
The web configuration file the chart writes into its Secret, as YAML; empty when it writes none
(no webConfig.config and no tls.secretName, or webConfig.existingSecret). With tls.secretName,
the tls_server_config keys naming files are filled in with the mounted files unless given:
cert_file and key_file, and client_ca_file when client certificates are asked for.
*/}}
{{- define "conntrack-exporter.webConfig" -}}
{{- if not .Values.webConfig.existingSecret }}
{{- $config := deepCopy (.Values.webConfig.config | default dict) }}
{{- if .Values.tls.secretName }}
{{- $dir := include "conntrack-exporter.tlsDir" . }}
{{- $tls := get $config "tls_server_config" | default dict }}
{{- if not (hasKey $tls "cert_file") }}
{{- $_ := set $tls "cert_file" (printf "%s/tls.crt" $dir) }}
{{- end }}
{{- if not (hasKey $tls "key_file") }}
{{- $_ := set $tls "key_file" (printf "%s/tls.key" $dir) }}
{{- end }}
{{- if and (ne ($tls.client_auth_type | default "NoClientCert") "NoClientCert") (not (hasKey $tls "client_ca_file")) }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- $_ := set $config "tls_server_config" $tls }}
{{- end }}
{{- if $config }}
{{- toYaml $config }}
{{- end }}
{{- end }}
{{- end }}

{{/*
What the web configuration turns on, as YAML: file (a web configuration file is mounted and
passed), tls, basicAuth, clientCert (client certificates are required: the kubelet has none).
With webConfig.existingSecret the chart cannot read the file: TLS is on with tls.secretName,
and webConfig.basicAuth and webConfig.requireClientCert say the rest. Fails on contradictory
values.
*/}}
{{- define "conntrack-exporter.webSecurity" -}}
{{- $web := .Values.webConfig }}
{{- $tlsSecret := .Values.tls.secretName }}
{{- $given := $web.config | default dict }}
{{- if and $web.existingSecret $given }}
{{- fail "webConfig.config and webConfig.existingSecret: set one, not both" }}
{{- end }}
{{- if and (hasKey $given "tls_server_config") (not $tlsSecret) }}
{{- fail "webConfig.config.tls_server_config needs tls.secretName: the certificate and key are mounted from that Secret" }}
{{- end }}
{{- if and (not $web.existingSecret) (or $web.basicAuth $web.requireClientCert) }}
{{- fail "webConfig.basicAuth and webConfig.requireClientCert describe webConfig.existingSecret; with webConfig.config the chart reads basic_auth_users and client_auth_type" }}
{{- end }}
{{- if and $web.requireClientCert (not $tlsSecret) }}
{{- fail "webConfig.requireClientCert needs TLS: set tls.secretName" }}
{{- end }}
{{- if $web.existingSecret }}
file: true
tls: {{ not (empty $tlsSecret) }}
basicAuth: {{ $web.basicAuth | default false }}
clientCert: {{ $web.requireClientCert | default false }}
{{- else }}
{{- $config := include "conntrack-exporter.webConfig" . | fromYaml }}
{{- $tls := $config.tls_server_config | default dict }}
file: {{ not (empty $config) }}
tls: {{ not (empty $tls) }}
basicAuth: {{ not (empty $config.basic_auth_users) }}
clientCert: {{ eq ($tls.client_auth_type | default "") "RequireAndVerifyClientCert" }}
{{- end }}
{{- end }}

{{/*
The exporter's configuration file, as YAML (empty: none): config, with
web.unauthenticated_healthz true when basic authentication is on and config does not set it,
so that the probes reach /healthz without credentials.
*/}}
{{- define "conntrack-exporter.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $security := include "conntrack-exporter.webSecurity" . | fromYaml }}
{{- if $security.basicAuth }}
{{- $web := get $config "web" | default dict }}
{{- if not (hasKey $web "unauthenticated_healthz") }}
{{- $_ := set $web "unauthenticated_healthz" true }}
{{- end }}
{{- $_ := set $config "web" $web }}
{{- end }}
{{- if $config }}
{{- toYaml $config }}
{{- end }}
{{- end }}

{{/*
The probes' handler: GET /healthz (over HTTPS with TLS), or only a TCP connection when the
kubelet cannot pass: client certificates required, or basic authentication with
config.web.unauthenticated_healthz set to false.
*/}}
{{- define "conntrack-exporter.probeHandler" -}}
{{- $security := include "conntrack-exporter.webSecurity" . | fromYaml }}
{{- $config := include "conntrack-exporter.config" . | fromYaml }}
{{- $healthzOpen := ($config.web | default dict).unauthenticated_healthz | default false }}
{{- if or $security.clientCert (and $security.basicAuth (not $healthzOpen)) }}
tcpSocket:
  port: metrics
{{- else }}
httpGet:
  path: /healthz
  port: metrics
  {{- if $security.tls }}
  scheme: HTTPS
  {{- end }}
{{- end }}
{{- end }}

{{/* The monitors' scheme: the value, or https with TLS. Argument: (list $ monitor values). */}}
{{- define "conntrack-exporter.monitorScheme" -}}
{{- $root := index . 0 }}
{{- $security := include "conntrack-exporter.webSecurity" $root | fromYaml }}
{{- (index . 1).scheme | default (ternary "https" "http" $security.tls) }}
{{- end }}
