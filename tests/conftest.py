"""Shared fixtures: one local Ray for the session, the embedded SmolLM2 GGUF, a cache dir for generated models."""

from __future__ import annotations

import os

import pytest

from shardserve.cluster.config import default_model_path
from tests.fixtures.producers import CACHE_ROOT

CACHE = str(CACHE_ROOT)  # outside the repository: a clean clone keeps what earlier runs built


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # logical CPUs above the 2 real cores: TP ranks share them (gloo), each needs a bundle
        # address "local": a private cluster, never one a `ray start` left on the machine (ray.init() would join it)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cache_dir() -> str:
    os.makedirs(CACHE, exist_ok=True)
    return CACHE
