"""Settings for the whole test suite."""
import pytest


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the scan's many small operations gain nothing from a second thread on
    a busy 2-core machine, and lose a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
