"""Ingress gateway: serves Kubernetes Ingress resources on gateway Envoys (feature in a later issue)."""

from __future__ import annotations
