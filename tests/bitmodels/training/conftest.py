"""Training tests run tiny matmuls: one intra-op thread is as fast and never stalls on a busy CI machine."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
