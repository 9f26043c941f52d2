"""Fixtures shared by the integration tests."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for one test module (a module may define its own to differ)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.path.join(ROOT, ".cache", "ray"))
    yield ray
    ray.shutdown()
