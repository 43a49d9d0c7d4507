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


# The files that take longest, longest first (pytest.ini turns off xdist's reordering by test count): each of the
# two workers takes the next whole file when it finishes one, so starting with the long ones and ending with the
# many short ones keeps both busy to the end (longest-processing-time-first scheduling).
LONGEST_FIRST = [
    "test_reward_lm.py",
    "test_docs.py",
    "test_scaling.py",
    "test_ilql.py",
    "test_alol.py",
    "test_ppo.py",
    "test_nlpo.py",
    "test_faults.py",
    "test_copy.py",
    "test_precision.py",
]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, the collected order stays


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is as fast, and on a busy 2-core machine several threads per
    process make every small matmul wait on the others (a 100x slowdown measured here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
