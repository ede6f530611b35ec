import uuid

import pytest
import torch

from engine.config import RayConfig
from engine.execution import ray_session, require_ray
from engine.store import Store


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session, started now; stages reuse it."""
    with ray_session(RayConfig(num_cpus=2)):
        require_ray()
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


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    """A store on local disk, then the same tests on ``memory://``: an object store in
    miniature, with no atomic rename and no conditional write. Modules with stores of
    their own define their own ``store``."""
    if request.param == "file":
        return Store(f"file://{tmp_path}/store")
    return Store(f"memory://store-{uuid.uuid4().hex}")
