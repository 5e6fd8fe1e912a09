"""Test-suite setup.  Without a CUDA device, Triton's CPU interpreter is enabled (before anything imports triton:
importing torch does not), so the kernel tests run here.  With one, the suite runs the compiled kernels (the
tests marked ``gpu``: tests/test_graphs_gpu.py), and the kernel modules, which build CPU tensors for the
interpreter, are skipped unless ``TRITON_INTERPRET=1`` is set."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DIFFKD_POISON_OUTPUTS", "1")  # every kernel output starts NaN, so unwritten elements show
os.environ.pop("DIFFKD_BACKEND", None)  # the tests choose backends explicitly

import pytest  # noqa: E402

# Tests use tiny tensors: a second OpenMP thread only adds contention on a 2-core machine.
torch.set_num_threads(1)


INTERPRETER_MODULES = "test_kernels_"  # these tests put CPU tensors through backend="triton"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="builds CPU tensors for Triton's interpreter: run with TRITON_INTERPRET=1 (on a GPU "
                                   "the compiled kernels run in tests/test_graphs_gpu.py and benchmarks/)")
    for item in items:
        if item.path.name.startswith(INTERPRETER_MODULES):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One CPU thread in every test, also for a CLI run in-process without --threads (its default is
    $OMP_NUM_THREADS), and restored afterwards: a test that leaves two threads makes every later test run an
    OpenMP pool that spins, which on a busy 2-core machine made the suite several times slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
