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
{{- if and (has "mtls" $all) (not .Values.meshIdentity.enabled) -}}
{{- fail "plugins: mtls needs meshIdentity.enabled=true (sidecars need workload certificates for mutual TLS): enable it, or remove mtls" -}}
{{- end -}}
{{- if and (has "gateway_api" $all) (not (has "ingress" $all)) -}}
{{- fail "plugins: gateway_api needs ingress (Gateways are served by the ingress gateway proxies, with its --gateway-* options): add ingress to plugins, or remove gateway_api" -}}
{{- end -}}
{{- if and (has "tls" $all) (not (has "ingress" $all)) -}}
{{- fail "plugins: tls needs ingress (it serves the Ingress gateway's HTTPS): add ingress to plugins, or remove tls" -}}
{{- end -}}
{{- $all | join "," -}}
{{- end }}

{{/* Control-plane Service DNS name and the xDS address proxies connect to. */}}
{{- define "trafficmgr.xdsAddress" -}}
{{- printf "%s.%s.svc:%d" (include "trafficmgr.fullname" .) .Release.Namespace (int .Values.controlPlane.xdsPort) -}}
{{- end }}

{{/* Service names of the bundled Prometheus and Zipkin: prometheus.service.name and zipkin.service.name
     (default "prometheus" and "zipkin", the original project's names, which samples/ingress.yaml routes
     /api/v1 and /api/v2 to), or <release>-prometheus / <release>-zipkin when set to "". */}}
{{- define "trafficmgr.prometheusService" -}}
{{- .Values.prometheus.service.name | default (include "trafficmgr.componentName" (dict "root" . "component" "prometheus")) -}}
{{- end }}

{{- define "trafficmgr.zipkinService" -}}
{{- .Values.zipkin.service.name | default (include "trafficmgr.componentName" (dict "root" . "component" "zipkin")) -}}
{{- end }}

{{/* The IngressClasses other than ours that the cluster marks default (comma-separated; helm lookup, so
     empty under `helm template` and `--dry-run` without a cluster). */}}
{{- define "trafficmgr.otherDefaultIngressClasses" -}}
{{- $name := .Values.gateway.ingressClass.name -}}
{{- $others := list -}}
{{- range (lookup "networking.k8s.io/v1" "IngressClass" "" "").items | default list -}}
{{- $annotations := .metadata.annotations | default dict -}}
{{- if and (ne .metadata.name $name) (eq (get $annotations "ingressclass.kubernetes.io/is-default-class") "true") -}}
{{- $others = append $others .metadata.name -}}
{{- end -}}
{{- end -}}
{{- $others | join "," -}}
{{- end }}

{{/* "true" when our IngressClass is marked default: gateway.ingressClass.default true, or "auto" (the
     default) while no other IngressClass is the cluster's default. Never a second default by itself:
     with two defaults Kubernetes (1.25+) gives class-less Ingresses the newest, i.e. a chart installed
     later would silently take them from the controller the cluster already had. */}}
{{- define "trafficmgr.ingressClassDefault" -}}
{{- $d := .Values.gateway.ingressClass.default -}}
{{- if eq (toString $d) "auto" -}}
{{- if not (include "trafficmgr.otherDefaultIngressClasses" .) }}true{{ end -}}
{{- else if $d -}}
true
{{- end -}}
{{- end }}

{{/* host:port of Zipkin when tracing is selected and a Zipkin is deployed or given; else empty. */}}
{{- define "trafficmgr.zipkinAddress" -}}
{{- if has "tracing" .Values.plugins -}}
{{- if .Values.zipkin.address -}}
{{- .Values.zipkin.address -}}
{{- else if .Values.zipkin.enabled -}}
{{- printf "%s.%s.svc:%d" (include "trafficmgr.zipkinService" .) .Release.Namespace (int .Values.zipkin.port) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "trafficmgr.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Where extraPipPackages are installed: an emptyDir that trafficmgr appends to sys.path after
site-packages (TRAFFICMGR_PLUGIN_PATH, trafficmgr/core/plugins.py), so nothing there can replace a module
of the image the way a PYTHONPATH entry (searched first) would. */}}
{{- define "trafficmgr.pluginDir" -}}/opt/trafficmgr-plugins{{- end }}

{{/* Where the requirements file (ConfigMap <fullname>-pip-requirements) is mounted. */}}
{{- define "trafficmgr.pipRequirementsDir" -}}/etc/trafficmgr-pip{{- end }}

{{/* extraPipPackages as a requirements file; with extraPipRequireHashes (the default) every entry must pin
one version and carry its sha256 (pip's hash-checking mode accepts nothing else). */}}
{{- define "trafficmgr.pipRequirements" -}}
{{- range $i, $req := .Values.extraPipPackages }}
{{- if and $.Values.extraPipRequireHashes (not (regexMatch "^[A-Za-z0-9][A-Za-z0-9._-]*(\\[[A-Za-z0-9,._-]+\\])?==[^ ;=]+( +--hash=sha256:[0-9a-f]{64})+$" $req)) }}
{{- fail (printf "extraPipPackages[%d] %q: each entry must be <name>==<version> --hash=sha256:<64 hex digits> (pip installs with --require-hashes --no-deps --only-binary=:all:; get the hash with `pip download --no-deps <name>==<version>` and `pip hash <wheel>`). Better: build a derived image (images/README.md). extraPipRequireHashes=false turns the check off (development only)." $i $req) }}
{{- end }}
{{ $req }}
{{- end }}
{{- end }}

{{/* The init container installing extraPipPackages (rendered only when some are listed). */}}
{{- define "trafficmgr.pipInitContainer" -}}
{{- if .Values.extraPipPackages }}
- name: install-plugins
  image: {{ include "trafficmgr.mainImage" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [python3, -m, pip, install, --no-cache-dir, --disable-pip-version-check, --no-warn-script-location, --target, {{ include "trafficmgr.pluginDir" . }}]
  args:
    {{- if .Values.extraPipRequireHashes }}
    # Hash-checking mode: exactly the listed wheels, no dependency resolution, no source build (setup.py).
    - --require-hashes
    - --no-deps
    - "--only-binary=:all:"
    {{- end }}
    {{- range .Values.extraPipArgs }}
    - {{ . | quote }}
    {{- end }}
    - --requirement={{ include "trafficmgr.pipRequirementsDir" . }}/requirements.txt
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
    - name: pip-requirements
      mountPath: {{ include "trafficmgr.pipRequirementsDir" . }}
      readOnly: true
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
# Appended to sys.path after site-packages (not PYTHONPATH, which Python searches first).
- name: TRAFFICMGR_PLUGIN_PATH
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
- name: pip-requirements
  configMap:
    name: {{ include "trafficmgr.fullname" . }}-pip-requirements
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

{{/* Value combinations the schema cannot express; included once by controlplane.yaml. */}}
{{- define "trafficmgr.checks" -}}
{{- if and (eq .Values.controlPlane.xdsAuth "mtls") (not .Values.meshIdentity.enabled) (or (not .Values.controlPlane.xdsTls.secretName) (and .Values.gateway.enabled (not .Values.gateway.xdsTls.secretName))) }}
{{- fail "controlPlane.xdsAuth=mtls without meshIdentity needs controlPlane.xdsTls.secretName and gateway.xdsTls.secretName (or enable meshIdentity: proxies then present their workload certificates)" }}
{{- end }}
{{- if and (eq .Values.controlPlane.xdsAuth "none") (not .Values.controlPlane.allowInsecureXds) }}
{{- fail "controlPlane.xdsAuth=none lets any client that reaches the xDS port claim any identity, the gateway's included (and receive every Ingress TLS private key): set controlPlane.allowInsecureXds=true too if this is a development cluster, else use peer-ip (the default) or mtls" }}
{{- end }}
{{- end }}

{{/* The gateway's ServiceAccount: the only one whose pods may claim the gateway role over xDS. */}}
{{- define "trafficmgr.gatewayServiceAccount" -}}
{{- include "trafficmgr.componentName" (dict "root" . "component" "gateway") -}}
{{- end }}

{{/* Where xDS client/server certificates are mounted with xdsAuth mtls (a Secret: tls.crt, tls.key, ca.crt). */}}
{{- define "trafficmgr.xdsTlsDir" -}}/etc/trafficmgr/xds-tls{{- end }}

{{/* Mesh identity: the CA Secret, the signing service's address and the name its certificate carries. */}}
{{- define "trafficmgr.meshCASecret" -}}
{{- .Values.meshIdentity.ca.secretName | default (printf "%s-mesh-ca" (include "trafficmgr.fullname" .)) -}}
{{- end }}
{{- define "trafficmgr.identityServerName" -}}
{{- printf "%s.%s.svc" (include "trafficmgr.fullname" .) .Release.Namespace -}}
{{- end }}
{{- define "trafficmgr.identityAddress" -}}
{{- printf "%s:%d" (include "trafficmgr.identityServerName" .) (int .Values.meshIdentity.port) -}}
{{- end }}
{{/* The trust bundle ConfigMap the control plane publishes in its namespace (fixed name: agents look it up). */}}
{{- define "trafficmgr.trustBundle" -}}trafficmgr-trust-bundle{{- end }}
{{/* Where a projected ServiceAccount token with the mesh audience is mounted (agent, gateway). */}}
{{- define "trafficmgr.identityTokenDir" -}}/var/run/secrets/trafficmgr{{- end }}
{{- define "trafficmgr.identityTokenVolume" -}}
# A token only the signing service accepts (audience {{ .Values.meshIdentity.tokenAudience }}): the API server refuses it, so
# this pod gets no Kubernetes API access from it. Bound to the pod; the kubelet renews it.
- name: identity-token
  projected:
    sources:
      - serviceAccountToken:
          audience: {{ .Values.meshIdentity.tokenAudience }}
          expirationSeconds: 3600
          path: token
{{- end }}

{{/* The gateway's identity fetcher: an init container (--once, so Envoy starts with a certificate) and a
     sidecar container that renews it. */}}
{{- define "trafficmgr.gatewayIdentity" -}}
- name: {{ .name }}
  image: {{ include "trafficmgr.mainImage" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  # The gateway's own workload certificate (its key is made here and stays in the pod's memory-backed
  # emptyDir): it originates mutual TLS to meshed backends and, with xdsAuth mtls, authenticates to xDS.
  args:
    - identity
    - --log-level={{ .root.Values.logLevel }}
    - --dir={{ include "trafficmgr.gatewayProxyDir" .root }}
    - --token-file={{ include "trafficmgr.identityTokenDir" .root }}/token
    - --ca-address={{ include "trafficmgr.identityAddress" .root }}
    - --ca-server-name={{ include "trafficmgr.identityServerName" .root }}
    - --bundle-file=/etc/trafficmgr/trust-bundle/ca.crt
    - --pod=$(POD_NAMESPACE)/$(POD_NAME)
    - --pod-uid=$(POD_UID)
    - --service-account={{ include "trafficmgr.gatewayServiceAccount" .root }}
    - --trust-domain={{ .root.Values.meshIdentity.trustDomain }}
    {{- if .once }}
    - --once
    {{- end }}
  env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    - name: POD_UID
      valueFrom: {fieldRef: {fieldPath: metadata.uid}}
    {{- include "trafficmgr.commonEnv" .root | nindent 4 }}
  {{- if not .once }}
  # Healthy while the certificate in the shared directory is valid for at least another 10 % of its life.
  livenessProbe:
    exec:
      command: [trafficmgr, identity, --check, --dir={{ include "trafficmgr.gatewayProxyDir" .root }}]
    periodSeconds: 30
    failureThreshold: 4
  readinessProbe:
    exec:
      command: [trafficmgr, identity, --check, --dir={{ include "trafficmgr.gatewayProxyDir" .root }}]
    periodSeconds: 10
  {{- end }}
  resources:
    requests: {cpu: 10m, memory: 48Mi}
    limits: {memory: 128Mi}
  securityContext:
    {{- toYaml .root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    {{- include "trafficmgr.commonMounts" .root | nindent 4 }}
    - name: proxy
      mountPath: {{ include "trafficmgr.gatewayProxyDir" .root }}
    - name: identity-token
      mountPath: {{ include "trafficmgr.identityTokenDir" .root }}
      readOnly: true
    - name: trust-bundle
      mountPath: /etc/trafficmgr/trust-bundle
      readOnly: true
{{- end }}
{{- define "trafficmgr.gatewayProxyDir" -}}/var/run/trafficmgr/proxy{{- end }}

{{/* The smallest of a list of ports (as a string). */}}
{{- define "trafficmgr.minPort" -}}
{{- $min := 65536 -}}
{{- range . -}}{{- if lt (int .) $min -}}{{- $min = int . -}}{{- end -}}{{- end -}}
{{- $min -}}
{{- end }}
