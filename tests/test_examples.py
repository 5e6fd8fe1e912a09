"""Every example runs: two training steps on random data, in a subprocess as a user would start it."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
needs_torchdistill = pytest.mark.skipif(importlib.util.find_spec("torchdistill") is None,
                                        reason="torchdistill is not installed (pip install -e '.[integrations]')")


@pytest.mark.parametrize("example, arguments", [
    ("plain_loop.py", ["--data", "random", "--batch-size", "4"]),
    ("timm_task.py", ["--data", "random", "--batch-size", "4"]),
    pytest.param("torchdistill_cifar100.py", ["--batch-size", "4"], marks=needs_torchdistill),
])
def test_example_runs_two_steps(example, arguments):
    result = subprocess.run([sys.executable, str(EXAMPLES / example), "--steps", "2", *arguments], cwd=EXAMPLES,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step 2/2  loss" in result.stdout, result.stdout[-3000:]
