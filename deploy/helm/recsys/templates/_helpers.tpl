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

{{/* Native gRPC probes against grpc.health.v1 (startup sized for bundle loading). */}}
{{- define "recsys.probes" -}}
{{- $probes := .values.probes -}}
startupProbe:
  grpc:
    port: {{ .values.port }}
    service: {{ $probes.grpcService | quote }}
  periodSeconds: {{ $probes.startup.periodSeconds }}
  failureThreshold: {{ $probes.startup.failureThreshold }}
  timeoutSeconds: {{ $probes.startup.timeoutSeconds }}
readinessProbe:
  grpc:
    port: {{ .values.port }}
    service: {{ $probes.grpcService | quote }}
  periodSeconds: {{ $probes.readiness.periodSeconds }}
  failureThreshold: {{ $probes.readiness.failureThreshold }}
  timeoutSeconds: {{ $probes.readiness.timeoutSeconds }}
livenessProbe:
  grpc:
    port: {{ .values.port }}
    service: {{ $probes.grpcService | quote }}
  periodSeconds: {{ $probes.liveness.periodSeconds }}
  failureThreshold: {{ $probes.liveness.failureThreshold }}
  timeoutSeconds: {{ $probes.liveness.timeoutSeconds }}
{{- end }}

{{/* Settings every service reads (recsys.serving.config.ServingConfig), as a name -> value dict. */}}
{{- define "recsys.commonEnv" -}}
RECSYS_HOST: "0.0.0.0"
RECSYS_PORT: {{ .values.port | quote }}
RECSYS_METRICS_PORT: {{ .values.metricsPort | quote }}
RECSYS_LOG_LEVEL: {{ .values.config.logLevel | quote }}
RECSYS_GRACE_SECONDS: {{ sub .values.terminationGracePeriodSeconds 5 | quote }}
{{- end }}

{{/* Renders a name -> value dict as an env list, sorted by name. */}}
{{- define "recsys.envList" -}}
{{- range $name, $value := . }}
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

{{/* A gRPC + metrics ClusterIP Service (the one Prometheus scrapes). */}}
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
