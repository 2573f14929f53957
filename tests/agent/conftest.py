"""Fixtures of the node agent tests: the cluster rig, the test Docker engine and its images."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.agent.rig import DOCKER_HOST, Cluster, require
from trafficmgr.testing import netns


@pytest.fixture
def cluster(envoy_binary: str) -> Iterator[Cluster]:
    require(netns.available())
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def docker_api() -> Iterator[Any]:
    """The low-level client of the test Docker engine (``.ci/install.d/docker.sh``)."""
    import docker

    try:
        api = docker.APIClient(base_url=DOCKER_HOST, version="auto", timeout=30)
    except docker.errors.DockerException as exc:
        require(f"no Docker engine at {DOCKER_HOST} (start it with .ci/install.d/docker.sh): {exc}")
    yield api
    for c in api.containers(all=True, filters={"label": "trafficmgr.test"}):  # leftovers of failed tests
        api.remove_container(c["Id"], force=True)
    api.close()


@pytest.fixture(scope="session")
def images(docker_api: Any, envoy_binary: str) -> dict[str, str]:
    from trafficmgr.testing.images import busybox_image, envoy_image

    return {"busybox": busybox_image(docker_api), "envoy": envoy_image(docker_api)}
