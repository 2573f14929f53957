"""HTTPS on the ingress gateway from kubernetes.io/tls Secrets (feature in a later issue)."""

from __future__ import annotations
