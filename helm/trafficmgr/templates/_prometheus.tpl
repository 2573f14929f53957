{{/* The bundled Prometheus' prometheus.yml (tests/helm checks it with promtool). */}}
{{- define "trafficmgr.prometheusConfig" -}}
global:
  scrape_interval: {{ .Values.prometheus.scrapeInterval }}
  evaluation_interval: {{ .Values.prometheus.scrapeInterval }}
scrape_configs:
  # Sidecar Envoys: pods whose traffic.envoy.proxy annotation is set (the agent empties it when it
  # removes the sidecar); the sidecar's stats-only listener serves /stats/prometheus on the pod IP.
  - job_name: envoy
    metrics_path: /stats/prometheus
    kubernetes_sd_configs:
      - role: pod
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_traffic_envoy_proxy]
        regex: .+
        action: keep
      - source_labels: [__meta_kubernetes_pod_annotation_traffic_envoy_proxy]
        regex: ingress
        action: drop
      - source_labels: [__meta_kubernetes_pod_phase]
        regex: Running
        action: keep
      # role: pod yields one target per container port; all become the same address and Prometheus
      # keeps one of the identical targets.
      - source_labels: [__address__]
        regex: '([^:]+)(?::\d+)?'
        replacement: '${1}:{{ .Values.agent.statsPort }}'
        target_label: __address__
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
  # Gateway Envoys (traffic.envoy.proxy=ingress): the stats container port of this release's gateway pods.
  - job_name: envoy-gateway
    metrics_path: /stats/prometheus
    kubernetes_sd_configs:
      - role: pod
        namespaces:
          names: [{{ .Release.Namespace }}]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance, __meta_kubernetes_pod_label_app_kubernetes_io_component, __meta_kubernetes_pod_container_port_name]
        regex: '{{ .Release.Name }};gateway;http-stats'
        action: keep
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
  # The control plane's own metrics (xDS pushes, NACKs, build times) on its metrics port.
  - job_name: trafficmgr
    metrics_path: /metrics
    kubernetes_sd_configs:
      - role: pod
        namespaces:
          names: [{{ .Release.Namespace }}]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance, __meta_kubernetes_pod_label_app_kubernetes_io_component, __meta_kubernetes_pod_container_port_name]
        regex: '{{ .Release.Name }};control-plane;http-metrics'
        action: keep
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
{{- end }}
