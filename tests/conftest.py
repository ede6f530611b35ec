import pytest

from engine.config import RayConfig
from engine.execution import ray_session


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session; stages reuse an initialised Ray."""
    with ray_session(RayConfig(num_cpus=2)):
        yield
