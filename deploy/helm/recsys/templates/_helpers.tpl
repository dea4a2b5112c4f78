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
switch is on, else the shared image (the gateway: its tag with "-gateway").
(dict "root" $ "values" .Values.recall "gpu" true) */}}
{{- define "recsys.image" -}}
{{- $root := .root }}
{{- $repository := $root.Values.image.repository }}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- if .gpu }}
{{- $repository = $root.Values.gpu.image.repository }}
{{- $tag = default (printf "%s-gpu" $root.Chart.AppVersion) $root.Values.gpu.image.tag }}
{{- else if .gateway }}
{{- /* The gateway's own image (deploy/docker/Dockerfile.gateway): no model runtimes. */}}
{{- $tag = printf "%s-gateway" (default $root.Chart.AppVersion $root.Values.image.tag) }}
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

{{/* Where a pod runs: priority, node selector and tolerations (the GPU pool's added with "gpu"),
affinity (the `podAntiAffinity` preset unless `affinity` has its own), and topology spread over
zones and nodes (ScheduleAnyway by default) plus `topologySpreadConstraints`. "revisionLabel":
the label telling a rollout's old pods from its new ones (pod-template-hash for Deployments,
controller-revision-hash for StatefulSets), so the spread counts the new revision's pods only.
(dict "root" $ "component" c "values" v "gpu" bool "revisionLabel" l) */}}
{{- define "recsys.scheduling" -}}
{{- $values := .values }}
{{- $root := .root }}
{{- $selector := include "recsys.selectorLabels" . | fromYaml }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- $nodeSelector := $values.nodeSelector | default dict }}
{{- $tolerations := $values.tolerations | default list }}
{{- if .gpu }}
{{- $nodeSelector = merge (deepCopy $nodeSelector) $root.Values.gpu.nodeSelector }}
{{- $tolerations = concat $tolerations $root.Values.gpu.tolerations }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := deepCopy ($values.affinity | default dict) }}
{{- if and $values.podAntiAffinity (not (hasKey $affinity "podAntiAffinity")) }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" $selector) }}
{{- if eq $values.podAntiAffinity "hard" }}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
{{- else }}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
{{- end }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $constraints := list }}
{{- if $values.topologySpread.enabled }}
{{- range $key := $values.topologySpread.topologyKeys }}
{{- $constraints = append $constraints (dict "maxSkew" 1 "topologyKey" $key "whenUnsatisfiable" $values.topologySpread.whenUnsatisfiable "labelSelector" (dict "matchLabels" $selector) "matchLabelKeys" (list $.revisionLabel)) }}
{{- end }}
{{- end }}
{{- $constraints = concat $constraints ($values.topologySpreadConstraints | default list) }}
{{- with $constraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The bundle a model pod serves, resolved from <model>.bundle and bundles: a dict with "mode"
(store | url | claim), "url", "version", "sha256", "subPath"; fails with a message on a missing
version or checksum or on two sources. (dict "root" $ "component" c "values" v) */}}
{{- define "recsys.bundleSource" -}}
{{- $component := .component }}
{{- $bundle := .values.bundle }}
{{- $store := $bundle.store | default .root.Values.bundles.store }}
{{- if not $bundle.version }}
{{- fail (printf "%s.bundle.version is required: the bundle version the pods serve (recsys bundle publish prints it). A model without a version cannot be rolled back" $component) }}
{{- end }}
{{- $sources := list }}
{{- if $bundle.existingClaim }}{{ $sources = append $sources "existingClaim" }}{{ end }}
{{- if $bundle.url }}{{ $sources = append $sources "url" }}{{ end }}
{{- if $bundle.store }}{{ $sources = append $sources "store" }}{{ end }}
{{- if gt (len $sources) 1 }}
{{- fail (printf "%s.bundle: set one of store, url or existingClaim, not %s" $component (join " and " $sources)) }}
{{- end }}
{{- $source := dict "version" $bundle.version "sha256" $bundle.sha256 }}
{{- if $bundle.existingClaim }}
{{- $_ := set $source "mode" "claim" }}
{{- $_ = set $source "subPath" (trimPrefix "/" (printf "%s/%s" (trimSuffix "/" $bundle.subPath) $bundle.version)) }}
{{- $_ = set $source "url" (printf "pvc://%s/%s" $bundle.existingClaim (get $source "subPath")) }}
{{- else }}
{{- if not (or $bundle.url $store) }}
{{- fail (printf "%s.bundle: no source: set bundles.store (s3://, gs://, https://: where `recsys bundle publish --store` uploads), %s.bundle.url, or %s.bundle.existingClaim" $component $component $component) }}
{{- end }}
{{- if not $bundle.sha256 }}
{{- fail (printf "%s.bundle.sha256 is required with a store or url: the archive's sha256 (recsys bundle publish prints it)" $component) }}
{{- end }}
{{- if $bundle.url }}
{{- $_ := set $source "mode" "url" }}
{{- $_ = set $source "url" $bundle.url }}
{{- else }}
{{- $_ := set $source "mode" "store" }}
{{- $_ = set $source "url" (printf "%s/%s/%s.tar" (trimSuffix "/" $store) $bundle.name $bundle.version) }}
{{- end }}
{{- end }}
{{- toYaml $source }}
{{- end }}

{{/* The container resources of recall/rank: `resources`, or with the GPU on the GPU pod's own
(`gpu.resources`, else the shared gpu.resources) plus the GPU limit. */}}
{{- define "recsys.modelResources" -}}
{{- $values := .values }}
{{- $resources := deepCopy $values.resources }}
{{- if $values.gpu.enabled }}
{{- $resources = deepCopy ($values.gpu.resources | default .root.Values.gpu.resources) }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits .root.Values.gpu.resourceName $values.gpu.count }}
{{- $_ = set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}
