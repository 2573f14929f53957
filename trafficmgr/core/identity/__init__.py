"""Mesh identity: SPIFFE IDs, the mesh CA, workload certificates and where Envoy finds them."""
