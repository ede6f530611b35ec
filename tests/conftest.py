import pytest
import torch

from engine.config import RayConfig
from engine.execution import ray_session


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session; stages reuse an initialised Ray."""
    with ray_session(RayConfig(num_cpus=2)):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads: their matrices are too small to split, and
    on a busy two-core runner two OpenMP threads spin-wait on each other (tests of tiny
    detectors ran twenty times slower). Modules of tiny-model tests use it for all tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
