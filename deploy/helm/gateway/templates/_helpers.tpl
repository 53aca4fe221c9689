{{/* The release's name for its objects: <release>-gateway, or the release name alone when it
already says gateway. */}}
{{- define "gateway.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gateway.labels" -}}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gateway.secretName" -}}
{{- .Values.existingSecret | default (include "gateway.fullname" .) -}}
{{- end -}}

{{- define "gateway.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag: pin a version, never latest" -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* The gateway's config.yaml: values.config with what the chart owns set over it. */}}
{{- define "gateway.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $server := $config.server | default dict -}}
{{- $_ := set $server "listen" (printf "0.0.0.0:%d" (int .Values.port)) -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $server "metrics_listen" (printf "0.0.0.0:%d" (int .Values.metrics.port)) -}}
{{- end -}}
{{- $_ := set $config "server" $server -}}
{{- $oidc := $config.oidc | default dict -}}
{{- $_ := set $oidc "client_secret" "${GW_CLIENT_SECRET}" -}}
{{- $_ := set $config "oidc" $oidc -}}
{{- $session := $config.session | default dict -}}
{{- $_ := set $session "store" "${GW_REDIS_URL}" -}}
{{- $_ := set $config "session" $session -}}
{{- if and (eq .Values.mode "sidecar") (not $config.routes) -}}
{{- $route := dict "name" "app" "path_prefix" "/" "upstream" (printf "http://127.0.0.1:%d" (int .Values.app.port)) -}}
{{- $_ := set $config "routes" (list $route) -}}
{{- end -}}
{{- if not $config.routes -}}
{{- fail "config.routes: name at least one route (standalone mode has no default)" -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The gateway's container, after its name: the Deployment's only one (standalone), or a
native sidecar. */}}
{{- define "gateway.container" -}}
image: {{ include "gateway.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  # The image's command is `gateway run`, reading the file $GATEWAY_CONFIG names.
  - name: GATEWAY_CONFIG
    value: /etc/gateway/config.yaml
  - name: GW_CLIENT_SECRET
    valueFrom:
      secretKeyRef:
        name: {{ include "gateway.secretName" . }}
        key: {{ .Values.secretKeys.clientSecret }}
  - name: GW_REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "gateway.secretName" . }}
        key: {{ .Values.secretKeys.redisUrl }}
ports:
  - name: http
    containerPort: {{ .Values.port }}
{{- if .Values.metrics.enabled }}
  - name: metrics
    containerPort: {{ .Values.metrics.port }}
{{- end }}
startupProbe:
  httpGet: {path: /oauth2/healthz, port: http}
  periodSeconds: 1
  failureThreshold: 30
livenessProbe:
  httpGet: {path: /oauth2/healthz, port: http}
  periodSeconds: 10
# 503 until the IdP metadata is loaded, and while draining after SIGTERM; a Redis blip does
# not count (it would take every replica out at once).
readinessProbe:
  httpGet: {path: /oauth2/readyz, port: http}
  periodSeconds: 5
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: config
    mountPath: /etc/gateway
    readOnly: true
  # The only writable path: server.workers > 1 keeps its metrics files here.
  - name: tmp
    mountPath: /tmp
{{- end -}}
