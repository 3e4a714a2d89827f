{{/* The CSI driver's name (driver.name): the CSIDriver object, the StorageClass's provisioner,
the plugin's socket dir under kubelet's, and (through --driver-name) the names of its Leases. */}}
{{- define "cachevol.driverName" -}}{{ .Values.driver.name }}{{- end }}

{{/* The node plugin's state dir on the host: node.stateDir, else /var/lib/cachevol for the
default driver (where installs before driver.name keep their bases and records) and
/var/lib/cachevol-<driver.name> for any other, so that a second install never shares it. */}}
{{- define "cachevol.nodeStateDir" -}}
{{- if .Values.node.stateDir }}
{{- .Values.node.stateDir }}
{{- else if eq .Values.driver.name "cachevol.dev" }}
{{- "/var/lib/cachevol" }}
{{- else }}
{{- printf "/var/lib/cachevol-%s" .Values.driver.name }}
{{- end }}
{{- end }}

{{- define "cachevol.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: the release name, with the chart name unless it has it. */}}
{{- define "cachevol.fullname" -}}
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

{{/* Labels of every object: the chart's, then commonLabels (which the schema keeps from
naming the chart's own). */}}
{{- define "cachevol.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "cachevol.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of a component's pods besides its selector labels: commonLabels and the
component's podLabels (which win where both name a label); call with
(dict "ctx" . "podLabels" map). Never in a selector, so changing them never orphans pods. */}}
{{- define "cachevol.podLabels" -}}
{{- with merge (dict) .podLabels .ctx.Values.commonLabels }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" . "component" "node"). */}}
{{- define "cachevol.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cachevol.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cachevol.componentLabels" -}}
{{ include "cachevol.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cachevol.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* A sidecar's image reference; call with the sidecar's values. A digest wins over the tag. */}}
{{- define "cachevol.sidecarImage" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository .image.tag }}
{{- end }}
{{- end }}

{{/* A component's ServiceAccount name; call with (dict "ctx" $ "component" "node"). */}}
{{- define "cachevol.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.name }}
{{- $sa.name }}
{{- else if $sa.create }}
{{- printf "%s-%s" (include "cachevol.fullname" .ctx) .component }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/* The Secret of store credentials, or nothing when there is none. */}}
{{- define "cachevol.storeSecret" -}}
{{- if .Values.store.existingSecret }}
{{- .Values.store.existingSecret }}
{{- else if .Values.store.credentials }}
{{- printf "%s-store" (include "cachevol.fullname" .) }}
{{- end }}
{{- end }}

{{/* envFrom and env of the cachevol container; call with
(dict "ctx" . "extraEnv" list "nodeName" bool). */}}
{{- define "cachevol.env" -}}
{{- $secret := include "cachevol.storeSecret" .ctx }}
{{- if $secret }}
envFrom:
  - secretRef:
      name: {{ $secret }}
{{- end }}
env:
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  - name: CACHEVOL_LOG
    value: {{ .ctx.Values.logLevel | quote }}
{{- if .nodeName }}
  - name: NODE_NAME
    valueFrom:
      fieldRef:
        fieldPath: spec.nodeName
{{- end }}
{{- with .extraEnv }}
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod annotations: a checksum of the chart-made Secret, so new credentials restart pods. */}}
{{- define "cachevol.podAnnotations" -}}
{{- $annotations := .annotations }}
{{- if and (not .ctx.Values.store.existingSecret) .ctx.Values.store.credentials }}
{{- $annotations = merge (dict "checksum/store-credentials" (toJson .ctx.Values.store.credentials | sha256sum)) $annotations }}
{{- end }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
