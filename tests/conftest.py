"""Settings for the whole test suite."""
import os

# OpenMP worker threads that spin while they wait make every one of the scan's many small operations 5-50x
# slower as soon as another process (nnU-Net's workers, a second test) wants a core; passive waiting avoids it.
# Set before torch is imported; nnU-Net subprocesses started by the tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the scan's many small operations gain nothing from a second thread on
    a busy 2-core machine, and lose a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
