"""Pipeline fixtures: one local Ray per test module."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """An embedded Ray for the module (the job reuses it instead of starting its own)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
