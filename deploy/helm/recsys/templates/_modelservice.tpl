{{/* Recall and rank share one shape: a bundle-serving gRPC service, optionally on a GPU.
Called as (dict "root" $ "component" "recall" "module" "recall_service"). */}}
{{- define "recsys.modelService" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $values := index $root.Values $component }}
{{- $ctx := dict "root" $root "component" $component "values" $values }}
{{- $fullname := include "recsys.fullname" $root }}
{{- $gpu := $values.gpu.enabled }}
{{- $bundle := $values.bundle }}
{{- $bundlePath := printf "/bundles/%s" $component }}
{{- if and $bundle.url $bundle.existingClaim }}
{{- fail (printf "%s.bundle: set either existingClaim or url, not both" $component) }}
{{- end }}
{{- if not (or $bundle.url $bundle.existingClaim) }}
{{- fail (printf "%s.bundle: set existingClaim (a PVC holding the bundle) or url (+ sha256)" $component) }}
{{- end }}
{{- if and $bundle.url (not $bundle.sha256) }}
{{- fail (printf "%s.bundle.sha256 is required with %s.bundle.url" $component $component) }}
{{- end }}
{{- $env := include "recsys.commonEnv" $ctx | fromYaml }}
{{- $_ := set $env "RECSYS_BUNDLE" $bundlePath }}
{{- $_ = set $env "RECSYS_DEVICE" (ternary "gpu" $values.config.device $gpu) }}
{{- $_ = set $env "RECSYS_THREADS" (include "recsys.threads" $ctx) }}
{{- $_ = set $env "RECSYS_MAX_BATCH" ($values.config.maxBatch | int64 | toString) }}
{{- $_ = set $env "RECSYS_MAX_WAIT_MS" ($values.config.maxWaitMs | toString) }}
{{- $_ = set $env "RECSYS_MAX_QUEUE" ($values.config.maxQueue | int64 | toString) }}
{{- $env = merge (deepCopy $values.env) $env }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}-{{ $component }}
  labels:
    {{- include "recsys.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not $values.autoscaling.enabled }}
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
      {{- with $values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "recsys.podSecurity" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      {{- if $bundle.url }}
      initContainers:
        - name: fetch-bundle
          image: {{ include "recsys.image" (dict "root" $root "values" $values "gpu" $gpu) | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            - python
            - /opt/recsys/fetch/fetch_bundle.py
            - --url
            - {{ $bundle.url | quote }}
            - --sha256
            - {{ $bundle.sha256 | quote }}
            - --dest
            - {{ $bundlePath | quote }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            requests:
              cpu: 100m
              memory: 128Mi
            limits:
              memory: 256Mi
          volumeMounts:
            - name: bundle
              mountPath: {{ $bundlePath }}
            - name: fetch-script
              mountPath: /opt/recsys/fetch
              readOnly: true
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ $component }}
          image: {{ include "recsys.image" (dict "root" $root "values" $values "gpu" $gpu) | quote }}
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
          {{- include "recsys.probes" $ctx | trim | nindent 10 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- $resources := deepCopy $values.resources }}
            {{- if $gpu }}
            {{- $limits := default (dict) $resources.limits }}
            {{- $_ := set $limits $root.Values.gpu.resourceName $values.gpu.count }}
            {{- $_ = set $resources "limits" $limits }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          volumeMounts:
            - name: bundle
              mountPath: {{ $bundlePath }}
              readOnly: true
              {{- if and $bundle.existingClaim $bundle.subPath }}
              subPath: {{ $bundle.subPath }}
              {{- end }}
            - name: tmp
              mountPath: /tmp
            {{- include "recsys.tlsVolumeMounts" $ctx | nindent 12 }}
      volumes:
        - name: bundle
          {{- if $bundle.existingClaim }}
          persistentVolumeClaim:
            claimName: {{ $bundle.existingClaim }}
            readOnly: true
          {{- else }}
          emptyDir:
            sizeLimit: {{ $bundle.sizeLimit }}
        - name: fetch-script
          configMap:
            name: {{ $fullname }}-fetch-bundle
          {{- end }}
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- include "recsys.tlsVolumes" $ctx | nindent 8 }}
      {{- $nodeSelector := $values.nodeSelector }}
      {{- $tolerations := $values.tolerations }}
      {{- if $gpu }}
      {{- $nodeSelector = merge (deepCopy $values.nodeSelector) $root.Values.gpu.nodeSelector }}
      {{- $tolerations = concat $values.tolerations $root.Values.gpu.tolerations }}
      {{- end }}
      {{- with $nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
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
{{- with include "recsys.hpa" $ctx | trim }}
---
{{ . }}
{{- end }}
{{- with include "recsys.pdb" $ctx | trim }}
---
{{ . }}
{{- end }}
{{- end }}
