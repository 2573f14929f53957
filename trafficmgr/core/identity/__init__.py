"""Mesh identity: SPIFFE IDs, the mesh CA, workload certificates and where Envoy finds them."""

#: The trust bundle the control plane publishes in its namespace (ConfigMap name and key); agents watch it.
BUNDLE_CONFIGMAP = "trafficmgr-trust-bundle"
BUNDLE_KEY = "ca.crt"
#: The signing service: its gRPC service, its one method and default port.
SERVICE = "trafficmgr.identity.v1.Identity"
METHOD = f"/{SERVICE}/Sign"
DEFAULT_PORT = 15012
