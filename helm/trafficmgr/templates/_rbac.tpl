{{/*
What the control plane reads, per plugin: the kinds `trafficmgr.core.controlplane.kinds_of()` returns for
a selection (tests/helm/test_rbac.py derives the expected rules from that code, so the two cannot drift).
"core" is always watched. Writes are separate: Events (always) and Ingress status (with `ingress`).
*/}}
{{- define "trafficmgr.watchedResources" -}}
core:
  "": [services, pods, namespaces]
  discovery.k8s.io: [endpointslices]
  apps: [replicasets, deployments, statefulsets, daemonsets]
ingress:
  networking.k8s.io: [ingresses, ingressclasses]
tls:
  "": [secrets]
mtls:
  "": [namespaces]
gateway_api:
  gateway.networking.k8s.io: [gatewayclasses, gateways, httproutes, grpcroutes, referencegrants]
  "": [secrets, namespaces]
{{- end }}

{{/* The control plane's ClusterRole rules for the selected plugins, as a YAML list. */}}
{{- define "trafficmgr.controlPlaneRules" -}}
{{- $table := include "trafficmgr.watchedResources" . | fromYaml }}
{{- $read := dict }}
{{- range $plugin := prepend .Values.plugins "core" }}
{{- range $group, $resources := (get $table $plugin | default dict) }}
{{- $_ := set $read $group (concat (get $read $group | default list) $resources | uniq | sortAlpha) }}
{{- end }}
{{- end }}
{{- range $group := keys $read | sortAlpha }}
- apiGroups: [{{ $group | quote }}]
  resources: [{{ get $read $group | join ", " }}]
  verbs: [get, list, watch]
{{- end }}
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.meshIdentity.enabled }}
# The signing service checks every caller's ServiceAccount token (audience, pod, node) with a TokenReview.
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
{{- end }}
{{- if has "gateway_api" .Values.plugins }}
# Gateway API status (GatewayClass, Gateway, HTTPRoute, GRPCRoute conditions and addresses).
- apiGroups: [gateway.networking.k8s.io]
  resources: [gatewayclasses/status, gateways/status, httproutes/status, grpcroutes/status]
  verbs: [update, patch]
{{- end }}
{{- if has "ingress" .Values.plugins }}
- apiGroups: [networking.k8s.io]
  resources: [ingresses/status]
  verbs: [update, patch]
{{- end }}
{{- with .Values.rbac.extraRules }}
{{ toYaml . }}
{{- end }}
{{- end }}
