{{/* Names, labels and the pieces every component shares. */}}

{{- define "recsys.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Leaves room for the longest suffix ("-recall-headless") within the 63-character limit. */}}
{{- define "recsys.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "recsys.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "recsys.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: recsys
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "recall"). */}}
{{- define "recsys.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recsys.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "recsys.componentLabels" -}}
{{ include "recsys.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "recsys.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "recsys.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The container image of a component: its own override, else the GPU image when its GPU
switch is on, else the shared image. (dict "root" $ "values" .Values.recall "gpu" true) */}}
{{- define "recsys.image" -}}
{{- $root := .root }}
{{- $repository := $root.Values.image.repository }}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- if .gpu }}
{{- $repository = $root.Values.gpu.image.repository }}
{{- $tag = default (printf "%s-gpu" $root.Chart.AppVersion) $root.Values.gpu.image.tag }}
{{- end }}
{{- $repository = default $repository .values.image.repository }}
{{- $tag = default $tag .values.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* Probes against grpc.health.v1 (startup sized for bundle loading): kubelet's native gRPC
probe, or with internalTLS (which kubelet's probe cannot speak) files/grpc_health_probe.py run in
the container with the pod's certificate. The health service needs no bearer token. */}}
{{- define "recsys.probes" -}}
{{- $probes := .values.probes -}}
{{- range $name, $probe := dict "startupProbe" $probes.startup "readinessProbe" $probes.readiness "livenessProbe" $probes.liveness }}
{{ $name }}:
  {{- if $.root.Values.internalTLS.enabled }}
  exec:
    command:
      - python
      - {{ printf "%s/grpc_health_probe.py" (include "recsys.probeScriptDir" .) }}
      - --port
      - {{ $.values.port | quote }}
      - --service
      - {{ $probes.grpcService | quote }}
      - --cert
      - {{ include "recsys.tlsDir" . }}/tls.crt
      - --key
      - {{ include "recsys.tlsDir" . }}/tls.key
      - --ca
      - {{ include "recsys.tlsDir" . }}/ca.crt
      - --timeout
      - {{ $probe.timeoutSeconds | quote }}
  {{- else }}
  grpc:
    port: {{ $.values.port }}
    service: {{ $probes.grpcService | quote }}
  {{- end }}
  periodSeconds: {{ $probe.periodSeconds }}
  failureThreshold: {{ $probe.failureThreshold }}
  timeoutSeconds: {{ $probe.timeoutSeconds }}
{{- end }}
{{- end }}

{{- define "recsys.tlsDir" -}}
/etc/recsys/tls
{{- end }}

{{- define "recsys.probeScriptDir" -}}
/opt/recsys/probe
{{- end }}

{{/* The internalTLS Secret of a component: (dict "root" $ "component" "recall"). */}}
{{- define "recsys.tlsSecret" -}}
{{- (index .root.Values.internalTLS .component).secretName | default (printf "%s-%s-tls" (include "recsys.fullname" .root) .component) }}
{{- end }}

{{/* internalTLS: the volume mount, volumes and env of a component ((dict "root" $ "component" c)). */}}
{{- define "recsys.tlsVolumeMounts" -}}
{{- if .root.Values.internalTLS.enabled }}
- name: tls
  mountPath: {{ include "recsys.tlsDir" . }}
  readOnly: true
- name: probe
  mountPath: {{ include "recsys.probeScriptDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "recsys.tlsVolumes" -}}
{{- if .root.Values.internalTLS.enabled }}
- name: tls
  secret:
    secretName: {{ include "recsys.tlsSecret" . }}
    defaultMode: 0440
- name: probe
  configMap:
    name: {{ include "recsys.fullname" .root }}-probe
{{- end }}
{{- end }}

{{/* recall/rank serve TLS and require a client certificate signed by ca.crt; the gateway dials
them with TLS verified against ca.crt and presents its certificate (RECSYS_TLS_CERT/KEY, which
gateway/server.py also uses as the client certificate, and which make its own port TLS too). */}}
{{- define "recsys.tlsEnv" -}}
{{- if .root.Values.internalTLS.enabled }}
{{- $dir := include "recsys.tlsDir" . }}
RECSYS_TLS_CERT: {{ printf "%s/tls.crt" $dir | quote }}
RECSYS_TLS_KEY: {{ printf "%s/tls.key" $dir | quote }}
{{- if eq .component "gateway" }}
RECSYS_DOWNSTREAM_TLS_CA: {{ printf "%s/ca.crt" $dir | quote }}
{{- else }}
RECSYS_TLS_CLIENT_CA: {{ printf "%s/ca.crt" $dir | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Compute threads of recall/rank: config.threads, or "auto" = the CPU request rounded down
("1500m" -> 1, "2" -> 2), at least 1. */}}
{{- define "recsys.threads" -}}
{{- $threads := .values.config.threads }}
{{- if eq (toString $threads) "auto" }}
{{- $request := toString (dig "requests" "cpu" "1" (.values.resources | default dict)) }}
{{- if hasSuffix "m" $request }}
{{- $threads = div (int (trimSuffix "m" $request)) 1000 }}
{{- else }}
{{- $threads = int (floor (float64 $request)) }}
{{- end }}
{{- end }}
{{- max 1 (int $threads) }}
{{- end }}

{{/* Settings every service reads (recsys.serving.config.ServingConfig), as a name -> value dict. */}}
{{- define "recsys.commonEnv" -}}
RECSYS_HOST: "0.0.0.0"
RECSYS_PORT: {{ .values.port | quote }}
RECSYS_METRICS_PORT: {{ .values.metricsPort | quote }}
RECSYS_LOG_LEVEL: {{ .values.config.logLevel | quote }}
RECSYS_GRACE_SECONDS: {{ sub .values.terminationGracePeriodSeconds 5 | quote }}
RECSYS_MAX_CONNECTION_AGE_S: {{ .values.config.maxConnectionAgeS | toString | quote }}
RECSYS_MAX_CONNECTION_AGE_GRACE_S: {{ .values.config.maxConnectionAgeGraceS | toString | quote }}
{{- include "recsys.tlsEnv" . | nindent 0 }}
{{- with .root.Values.tracing.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Renders a name -> value dict as an env list, sorted by name. Whole numbers are written as
digits (values arrive as float64, which toString would write as 1e+06). */}}
{{- define "recsys.envList" -}}
{{- range $name, $value := . }}
{{- if and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value) }}
{{- $value = int64 $value }}
{{- end }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{- define "recsys.podSecurity" -}}
serviceAccountName: {{ include "recsys.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A gRPC + metrics ClusterIP Service (the one Prometheus scrapes), plus the port `http` when
the context has a non-zero "httpPort" (the gateway's HTTP/JSON API; HTTPS with internalTLS). */}}
{{- define "recsys.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "recsys.fullname" .root }}-{{ .component }}
  labels:
    {{- include "recsys.componentLabels" . | nindent 4 }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ default "ClusterIP" .type }}
  selector:
    {{- include "recsys.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .values.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ .values.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- with .httpPort }}
    - name: http
      port: {{ . }}
      targetPort: http
      protocol: TCP
      appProtocol: {{ ternary "https" "http" $.root.Values.internalTLS.enabled }}
    {{- end }}
{{- end }}

{{- define "recsys.hpa" -}}
{{- $autoscaling := .values.autoscaling }}
{{- if $autoscaling.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "recsys.fullname" .root }}-{{ .component }}
  labels:
    {{- include "recsys.componentLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "recsys.fullname" .root }}-{{ .component }}
  minReplicas: {{ $autoscaling.minReplicas }}
  maxReplicas: {{ $autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $autoscaling.targetCPUUtilizationPercentage }}
    {{- if $autoscaling.latency.enabled }}
    - type: Pods
      pods:
        metric:
          name: {{ $autoscaling.latency.metricName }}
        target:
          type: AverageValue
          averageValue: {{ $autoscaling.latency.targetAverageValue | quote }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "recsys.pdb" -}}
{{- if .values.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "recsys.fullname" .root }}-{{ .component }}
  labels:
    {{- include "recsys.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "recsys.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* The Secret with the in-cluster Redis's password and the gateway's URL (keys password, url). */}}
{{- define "recsys.redisAuthSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "recsys.fullname" .)) }}
{{- end }}

{{/* The gateway's tokens Secret (key tokens.yaml): the user's, or the one the chart generates. */}}
{{- define "recsys.gatewayAuthSecret" -}}
{{- .Values.gateway.auth.existingSecret | default (printf "%s-gateway-auth" (include "recsys.fullname" .)) }}
{{- end }}
