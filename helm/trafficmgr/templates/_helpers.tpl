{{/* Chart name. */}}
{{- define "trafficmgr.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name: the release name when it contains the chart name, else release-chart. */}}
{{- define "trafficmgr.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Name of a component's objects: <fullname>-<component> (the control plane uses <fullname>). */}}
{{- define "trafficmgr.componentName" -}}
{{- printf "%s-%s" (include "trafficmgr.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trafficmgr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "trafficmgr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trafficmgr
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "control-plane"). */}}
{{- define "trafficmgr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trafficmgr.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "trafficmgr.componentLabels" -}}
{{ include "trafficmgr.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; the digest wins. (dict "image" .Values.image "default" .Chart.AppVersion) */}}
{{- define "trafficmgr.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag | toString) -}}
{{- end -}}
{{- end }}

{{- define "trafficmgr.mainImage" -}}
{{- include "trafficmgr.image" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end }}

{{- define "trafficmgr.envoyImage" -}}
{{- include "trafficmgr.image" (dict "image" .Values.envoyImage "default" "") -}}
{{- end }}

{{/* Every selected plugin (built-in then third-party), comma-separated: the --plugins value. */}}
{{- define "trafficmgr.pluginList" -}}
{{- $all := concat .Values.plugins .Values.extraPlugins | uniq -}}
{{- /* The built-in plugins' TRAFFICMGR_DEPENDS, checked here too so that a bad selection fails at install,
       not in a crash-looping pod. */ -}}
{{- if and (has "tls" $all) (not (has "ingress" $all)) -}}
{{- fail "plugins: tls needs ingress (it serves the Ingress gateway's HTTPS): add ingress to plugins, or remove tls" -}}
{{- end -}}
{{- $all | join "," -}}
{{- end }}

{{/* Control-plane Service DNS name and the xDS address proxies connect to. */}}
{{- define "trafficmgr.xdsAddress" -}}
{{- printf "%s.%s.svc:%d" (include "trafficmgr.fullname" .) .Release.Namespace (int .Values.controlPlane.xdsPort) -}}
{{- end }}

{{/* host:port of Zipkin when tracing is selected and a Zipkin is deployed or given; else empty. */}}
{{- define "trafficmgr.zipkinAddress" -}}
{{- if has "tracing" .Values.plugins -}}
{{- if .Values.zipkin.address -}}
{{- .Values.zipkin.address -}}
{{- else if .Values.zipkin.enabled -}}
{{- printf "%s.%s.svc:%d" (include "trafficmgr.componentName" (dict "root" . "component" "zipkin")) .Release.Namespace (int .Values.zipkin.port) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "trafficmgr.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Where extraPipPackages are installed (an emptyDir on PYTHONPATH). */}}
{{- define "trafficmgr.pluginDir" -}}/opt/trafficmgr-plugins{{- end }}

{{/* The init container installing extraPipPackages (rendered only when some are listed). */}}
{{- define "trafficmgr.pipInitContainer" -}}
{{- if .Values.extraPipPackages }}
- name: install-plugins
  image: {{ include "trafficmgr.mainImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [python3, -m, pip, install, --no-cache-dir, --disable-pip-version-check, --no-warn-script-location, --target, {{ include "trafficmgr.pluginDir" . }}]
  args:
    {{- range .Values.extraPipArgs }}
    - {{ . | quote }}
    {{- end }}
    {{- range .Values.extraPipPackages }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
  resources:
    requests: {cpu: 50m, memory: 128Mi}
    limits: {memory: 256Mi}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: plugins
      mountPath: {{ include "trafficmgr.pluginDir" . }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* Environment shared by every trafficmgr container. */}}
{{- define "trafficmgr.commonEnv" -}}
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- if .Values.extraPipPackages }}
- name: PYTHONPATH
  value: {{ include "trafficmgr.pluginDir" . }}
{{- end }}
{{- end }}

{{/* Volumes and mounts for extraPipPackages and a writable /tmp. */}}
{{- define "trafficmgr.commonVolumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.extraPipPackages }}
- name: plugins
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "trafficmgr.commonMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.extraPipPackages }}
- name: plugins
  mountPath: {{ include "trafficmgr.pluginDir" . }}
  readOnly: true
{{- end }}
{{- end }}
