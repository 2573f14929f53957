"""Kubernetes objects of the agent tests: an app Deployment on the agent's node, services with backends
on another node (their addresses live inside the test's pod network)."""

from __future__ import annotations

REVIEWS_PORT = 9080
BLOCKED_PORT = 9090

SERVICES = """
apiVersion: v1
kind: Service
metadata: {{name: reviews, labels: {{traffic.port.9080: http}}}}
spec:
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: blocked}}
spec:
  selector: {{app: blocked}}
  ports: [{{name: http, port: 9090, targetPort: 9090}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-1, labels: {{app: reviews}}}}
spec: {{nodeName: node-2, containers: [{{name: app, image: reviews}}]}}
status: {{podIP: {reviews_ip}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: blocked-1, labels: {{app: blocked}}}}
spec: {{nodeName: node-2, containers: [{{name: app, image: blocked}}]}}
status: {{podIP: {blocked_ip}, conditions: [{{type: Ready, status: "True"}}]}}
"""

WORKLOAD = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {app}}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  template:
    metadata: {{labels: {{app: {app}}}}}
    spec: {{containers: [{{name: app, image: app}}]}}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: {app}-6c9f
  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: {app}, uid: u-{app}, controller: true}}]
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  template:
    metadata: {{labels: {{app: {app}}}}}
    spec: {{containers: [{{name: app, image: app}}]}}
"""

POD = """
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {app}}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {app}-6c9f, uid: u-rs-{app}, controller: true}}]
spec: {{nodeName: {node}, containers: [{{name: app, image: app}}]}}
"""

POD_STATUS = """
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
"""


def pod(name: str, app: str, ip: str | None, node: str = "node-1") -> str:
    text = POD.format(name=name, app=app, node=node)
    return text + (POD_STATUS.format(ip=ip) if ip else "")
