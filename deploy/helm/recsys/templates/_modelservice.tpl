{{/* Recall and rank share one shape: a bundle-serving gRPC service, optionally on a GPU; recall
with `shards` > 1 runs as a StatefulSet, pod i serving shard i.
Called as (dict "root" $ "component" "recall" "module" "recall_service"). */}}
{{- define "recsys.modelService" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $values := index $root.Values $component }}
{{- $ctx := dict "root" $root "component" $component "values" $values }}
{{- $fullname := include "recsys.fullname" $root }}
{{- $gpu := $values.gpu.enabled }}
{{- $bundlePath := printf "/bundles/%s" $component }}
{{- $source := include "recsys.bundleSource" $ctx | fromYaml }}
{{- $shards := int ($values.shards | default 1) }}
{{- if and (gt $shards 1) (ne $component "recall") }}
{{- fail (printf "%s.shards: only recall is sharded" $component) }}
{{- end }}
{{- $sharded := gt $shards 1 }}
{{- if and $sharded (not ($root.Capabilities.KubeVersion.Version | semverCompare ">=1.28.0-0")) }}
{{- fail "recall.shards > 1 needs Kubernetes >= 1.28 (the apps.kubernetes.io/pod-index label gives each pod its shard)" }}
{{- end }}
{{- $env := include "recsys.commonEnv" $ctx | fromYaml }}
{{- $_ := set $env "RECSYS_BUNDLE" $bundlePath }}
{{- $_ = set $env "RECSYS_DEVICE" (ternary "gpu" $values.config.device $gpu) }}
{{- $resources := include "recsys.modelResources" $ctx | fromYaml }}
{{- $_ = set $env "RECSYS_THREADS" (include "recsys.threads" (dict "values" (dict "config" $values.config "resources" $resources))) }}
{{- $_ = set $env "RECSYS_MAX_BATCH" ($values.config.maxBatch | int64 | toString) }}
{{- $_ = set $env "RECSYS_MAX_WAIT_MS" ($values.config.maxWaitMs | toString) }}
{{- $_ = set $env "RECSYS_MAX_QUEUE" ($values.config.maxQueue | int64 | toString) }}
{{- if $sharded }}
{{- $_ = set $env "RECSYS_RECALL_SHARDS" ($shards | toString) }}
{{- end }}
{{- $env = merge (deepCopy $values.env) $env }}
{{- $image := include "recsys.image" (dict "root" $root "values" $values "gpu" $gpu) }}
apiVersion: apps/v1
kind: {{ ternary "StatefulSet" "Deployment" $sharded }}
metadata:
  name: {{ $fullname }}-{{ $component }}
  labels:
    {{- include "recsys.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if $sharded }}
  # One pod per shard: pod i (the pod-index label) serves shard i, at a stable DNS name.
  replicas: {{ $shards }}
  serviceName: {{ $fullname }}-{{ $component }}-headless
  podManagementPolicy: Parallel
  updateStrategy:
    type: RollingUpdate
  {{- else if not $values.autoscaling.enabled }}
  replicas: {{ $values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "recsys.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "recsys.componentLabels" $ctx | nindent 8 }}
        {{- with $values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- with $values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- include "recsys.bundleAnnotations" (dict "source" $source "prefix" "recsys/bundle") | nindent 8 }}
    spec:
      {{- include "recsys.podSecurity" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      {{- if ne $source.mode "claim" }}
      initContainers:
        {{- include "recsys.fetchBundleContainer" (dict "root" $root "source" $source "image" $image "path" $bundlePath) | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $component }}
          image: {{ $image | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", {{ .module | quote }}]
          ports:
            - name: grpc
              containerPort: {{ $values.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $values.metricsPort }}
              protocol: TCP
          env:
            {{- include "recsys.envList" $env | trim | nindent 12 }}
            {{- if $sharded }}
            # This pod's shard: its ordinal, from the label the StatefulSet controller sets.
            - name: RECSYS_RECALL_SHARD_INDEX
              valueFrom:
                fieldRef:
                  fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
            {{- end }}
            {{- with $values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "recsys.probes" $ctx | trim | nindent 10 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          volumeMounts:
            {{- include "recsys.bundleMount" (dict "source" $source "path" $bundlePath) | nindent 12 }}
            - name: tmp
              mountPath: /tmp
            {{- include "recsys.tlsVolumeMounts" $ctx | nindent 12 }}
            {{- with $values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "recsys.bundleVolumes" (dict "root" $root "source" $source "values" $values) | nindent 8 }}
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- include "recsys.tlsVolumes" $ctx | nindent 8 }}
        {{- with $values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- include "recsys.scheduling" (merge (dict "gpu" $gpu "revisionLabel" (ternary "controller-revision-hash" "pod-template-hash" $sharded)) $ctx) | nindent 6 }}
---
{{ include "recsys.service" $ctx }}
---
{{- /* Headless twin: the gateway resolves every pod (dns:///) so calls spread over replicas
instead of pinning one long-lived HTTP/2 connection to one pod. */}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}-{{ $component }}-headless
  labels:
    {{- include "recsys.componentLabels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: false
  selector:
    {{- include "recsys.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $values.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
{{- if not $sharded }}
{{- with include "recsys.hpa" $ctx | trim }}
---
{{ . }}
{{- end }}
{{- end }}
{{- with include "recsys.pdb" $ctx | trim }}
---
{{ . }}
{{- end }}
{{- end }}

{{/* The pod annotations of a served bundle (prefix "recsys/bundle" -> recsys/bundle-version,
-source, -sha256): a new version changes the pod template, so the pods roll, and `helm rollback`
restores the previous version with the previous values. */}}
{{- define "recsys.bundleAnnotations" -}}
{{ .prefix }}-version: {{ .source.version | quote }}
{{ .prefix }}-source: {{ .source.url | quote }}
{{- with .source.sha256 }}
{{ $.prefix }}-sha256: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The init container that fetches a bundle into the pod (not for claim sources): called as
(dict "root" $ "source" <recsys.bundleSource> "image" <image> "path" /bundles/<component>), and
"volume" <name> where a pod holds two bundles (default "bundle"; the container is fetch-<name>). */}}
{{- define "recsys.fetchBundleContainer" -}}
{{- $root := .root }}
{{- $volume := .volume | default "bundle" }}
# Fetches <store>/<name>/<version>.tar (or the url), checks its sha256, the manifest's
# version and every file's digest, and unpacks it into the pod's own emptyDir.
- name: fetch-{{ $volume }}
  image: {{ .image | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command:
    - python
    - /opt/recsys/fetch/fetch_bundle.py
    - --url
    - {{ .source.url | quote }}
    - --version
    - {{ .source.version | quote }}
    - --sha256
    - {{ .source.sha256 | quote }}
    - --dest
    - {{ .path | quote }}
  env:
    # Cloud SDKs write caches and config under $HOME; the root filesystem is read-only.
    - name: HOME
      value: /tmp
    {{- with $root.Values.bundles.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $root.Values.bundles.resources | nindent 4 }}
  volumeMounts:
    - name: {{ $volume }}
      mountPath: {{ .path }}
    - name: fetch-script
      mountPath: /opt/recsys/fetch
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* The serving container's read-only mount of the bundle at .path (volume .volume, default "bundle"). */}}
{{- define "recsys.bundleMount" -}}
- name: {{ .volume | default "bundle" }}
  mountPath: {{ .path }}
  readOnly: true
  {{- if eq .source.mode "claim" }}
  # This version's folder only: publishing another version never changes it.
  subPath: {{ .source.subPath }}
  {{- end }}
{{- end }}

{{/* The bundle volume (the claim, or an emptyDir the fetch container fills) and the fetch script
(unless "script" is false: a pod with two fetched bundles mounts the script once). */}}
{{- define "recsys.bundleVolumes" -}}
- name: {{ .volume | default "bundle" }}
  {{- if eq .source.mode "claim" }}
  persistentVolumeClaim:
    claimName: {{ .values.bundle.existingClaim }}
    readOnly: true
  {{- else }}
  emptyDir:
    sizeLimit: {{ .values.bundle.sizeLimit }}
  {{- if or (not (hasKey . "script")) .script }}
- name: fetch-script
  configMap:
    name: {{ include "recsys.fullname" .root }}-fetch-bundle
  {{- end }}
  {{- end }}
{{- end }}
