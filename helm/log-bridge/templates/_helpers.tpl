{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "log-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release name + chart name unless the release name already holds it.
*/}}
{{- define "log-bridge.fullname" -}}
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

{{/*
Chart label value.
*/}}
{{- define "log-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "log-bridge.labels" -}}
helm.sh/chart: {{ include "log-bridge.chart" . }}
{{ include "log-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: stable across upgrades, so never add anything that changes.
*/}}
{{- define "log-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "log-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of a pod that is not a replica (the drain Job's, the `helm test` pod): a name of its own, so that no
selector of the replicas (the Services, the PodDisruptionBudget, the HPA, the NetworkPolicy and its egress rules)
takes it for one. Takes (dict "root" $ "component" NAME).
*/}}
{{- define "log-bridge.auxiliaryLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "log-bridge.name" .root) .component | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Checksum of secret values for a pod annotation, which whoever may read the pods sees (not only who may read the
Secrets): scrypt first (derivePassword, salted with the release), so that a weak password cannot be guessed back
from it offline as from a plain sha256. Takes (dict "root" $ "value" TEXT "secret" BOOL); with "secret" false
(nothing secret in TEXT: every value empty) a plain sha256, since scrypt costs a render about 0.1 s.
*/}}
{{- define "log-bridge.secretChecksum" -}}
{{- if .secret }}
{{- derivePassword 1 "maximum" .value (printf "%s/%s" .root.Release.Namespace .root.Release.Name) "log-bridge" | sha256sum }}
{{- else }}
{{- .value | sha256sum }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "log-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "log-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret the environment variables come from.
*/}}
{{- define "log-bridge.secretName" -}}
{{- default (include "log-bridge.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
Image reference: digest wins over tag; the tag defaults to the appVersion.
*/}}
{{- define "log-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Port log-bridge listens on, read from the config so the two cannot disagree.
*/}}
{{- define "log-bridge.containerPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- $server.port | default 8443 | int }}
{{- end }}

{{/*
URL scheme of the pod's listener.
*/}}
{{- define "log-bridge.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/*
The log-bridge configuration as YAML: values.config, with server.tls filled in when tls.enabled.
*/}}
{{- define "log-bridge.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if .Values.tls.enabled }}
{{- $server := get $config "server" | default dict }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" .Values.tls.mountPath) "key_file" (printf "%s/tls.key" .Values.tls.mountPath) }}
{{- if .Values.tls.clientAuth }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" .Values.tls.mountPath) }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- $_ := set $config "server" $server }}
{{- end }}
{{- if .Values.admin.enabled }}
{{- $server := get $config "server" | default dict }}
{{- $_ := set $server "admin" (dict "port" .Values.admin.port) }}
{{- $_ := set $config "server" $server }}
{{- end }}
{{- if .Values.dedup.redis.enabled }}
{{- $journal := get $config "journal" | default dict }}
{{- $store := dict "type" "redis" "url" "${LOG_BRIDGE_REDIS_URL}" "key_prefix" .Values.dedup.redis.keyPrefix "timeout" .Values.dedup.redis.timeout }}
{{- $_ := set $journal "dedup_store" $store }}
{{- $_ := set $config "journal" $journal }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Probe: the values' probe with the port and scheme filled in (the admin port, plain HTTP, when admin.enabled).
*/}}
{{- define "log-bridge.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if hasKey $probe "httpGet" }}
{{- if .root.Values.admin.enabled }}
{{- $_ := set $probe.httpGet "port" (get $probe.httpGet "port" | default "admin") }}
{{- $_ := set $probe.httpGet "scheme" (get $probe.httpGet "scheme" | default "HTTP") }}
{{- else }}
{{- $_ := set $probe.httpGet "port" (get $probe.httpGet "port" | default "http") }}
{{- $_ := set $probe.httpGet "scheme" (get $probe.httpGet "scheme" | default (include "log-bridge.scheme" .root)) }}
{{- end }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
Seconds of a log-bridge duration (a number of seconds, or "500ms", "10s", "5m", "1h", "1d"), rounded up.
*/}}
{{- define "log-bridge.seconds" -}}
{{- if kindIs "string" . }}
{{- $text := trim . }}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 "" 1.0 }}
{{- mulf (regexFind "^[0-9.]+" $text | float64) (get $units (regexFind "(ms|s|m|h|d)$" $text)) | ceil | int }}
{{- else }}
{{- . | float64 | ceil | int }}
{{- end }}
{{- end }}

{{/*
Seconds of the preStop pause, which the kubelet counts in the grace period: Kubernetes' sleep action, or an exec of
["sleep", N]; 5 for any other hook (its length is unknown), 0 without one.
*/}}
{{- define "log-bridge.preStopSeconds" -}}
{{- $preStop := get (.Values.lifecycle | default dict) "preStop" | default dict }}
{{- $command := get (get $preStop "exec" | default dict) "command" | default list }}
{{- if hasKey $preStop "sleep" }}
{{- get $preStop.sleep "seconds" | int }}
{{- else if and (eq (len $command) 2) (eq (first $command | toString) "sleep") }}
{{- include "log-bridge.seconds" (last $command | toString) }}
{{- else if $preStop }}5
{{- else }}0
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the value when set, else the preStop pause + 2 x server.shutdown_timeout (delivery
once intake stops, then the requests still in flight) + 10 s for the exit.
*/}}
{{- define "log-bridge.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $server := .Values.config.server | default dict }}
{{- $shutdown := include "log-bridge.seconds" (get $server "shutdown_timeout" | default 10) | int }}
{{- add (include "log-bridge.preStopSeconds" . | int) (mul 2 $shutdown) 10 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The Redis URL's environment variable (dedup.redis), from dedup.redis.existingSecret or the chart's Secret.
*/}}
{{- define "log-bridge.redisEnv" -}}
{{- if .Values.dedup.redis.enabled }}
{{- if and (not .Values.dedup.redis.existingSecret) (not .Values.dedup.redis.url) }}
{{- fail "dedup.redis.enabled needs dedup.redis.url or dedup.redis.existingSecret" }}
{{- end }}
{{- if and (not .Values.dedup.redis.existingSecret) .Values.secrets.existingSecret }}
{{- fail "dedup.redis.url is stored in the chart's Secret, which secrets.existingSecret turns off: set dedup.redis.existingSecret" }}
{{- end }}
- name: LOG_BRIDGE_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.dedup.redis.existingSecret }}
      name: {{ .Values.dedup.redis.existingSecret }}
      key: {{ .Values.dedup.redis.existingSecretKey }}
      {{- else }}
      name: {{ include "log-bridge.fullname" . }}
      key: LOG_BRIDGE_REDIS_URL
      {{- end }}
{{- end }}
{{- end }}

{{/*
Seconds in a Prometheus duration with one unit ("90s", "30m", "6h", "2d", "1w"); values.schema.json enforces the form.
*/}}
{{- define "log-bridge.durationSeconds" -}}
{{- $number := regexFind "^[0-9]+" . }}
{{- $unit := trimPrefix $number . }}
{{- mul ($number | int) (get (dict "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800) $unit) }}
{{- end }}
