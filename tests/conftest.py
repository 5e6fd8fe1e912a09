"""Test-suite setup.  Without a CUDA device, Triton's CPU interpreter is enabled (before anything imports triton:
importing torch does not), so the kernel tests run here; with one, the suite runs the compiled kernels, and the
tests marked ``gpu`` (tests/test_graphs_gpu.py: graphed Triton heads) run too."""
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


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
