import os
import sys

import pytest

# OpenMP threads that busy-wait make tiny models 100x slower when the cores are shared with other
# processes; passive waiting costs nothing measurable on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# pytest.ini runs two workers on the 2 cores (pytest-xdist): one intra-op thread each, and for every process
# they start, so that two workers never put four busy threads on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# Tests import the scripts (`import ppo`) and `common` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is as fast, and on a busy 2-core machine several threads per
    process make every small matmul wait on the others (a 100x slowdown measured here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
