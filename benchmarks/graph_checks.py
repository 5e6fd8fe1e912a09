"""The GPU checks of CUDAGraphHead that gpu_check.py runs right after the training step: the GPU test module
(tests/test_graphs_gpu.py: graphed Triton heads against eager ones over accumulated steps, bf16 autocast,
channels-last, a new shape mid-run, DDP) and the cost of the gradient copies every replay makes
(diffkd.graphs.runtime.owned_copies, the fix for PyTorch issue 181723), at the ImageNet and CIFAR feature heads.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._report import Results, make_table
from benchmarks._timing import synchronize, time_gpu, time_left
from diffkd import DiffKDHead
from diffkd.graphs import owned_copies

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = "tests/test_graphs_gpu.py"
# (name, student channels, teacher channels, autoencoder latent channels): the benchmarks' feature heads.
COPY_HEADS = (("imagenet-feature", 512, 512, 1024), ("cifar-feature", 256, 256, None))
DRY_RUN_COPY_HEADS = (("tiny-feature", 8, 16, None),)  # the CPU plumbing check
HOST_CALLS = 200


def gradient_copy_cost(device: torch.device) -> list[dict]:
    """Per head: its parameter count, and the time of one ``owned_copies`` of all its parameter gradients against
    one ``clone()`` per gradient: device time (CUDA events; None on a CPU) and host time per call."""
    gpu = device.type == "cuda"
    rows = []
    for name, student, teacher, latent in COPY_HEADS if gpu else DRY_RUN_COPY_HEADS:
        head = DiffKDHead(student, teacher, use_ae=latent is not None, ae_channels=latent).to(device)
        grads = tuple(torch.randn_like(p) for p in head.parameters())
        record = {"head": name, "tensors": len(grads), "elements": sum(g.numel() for g in grads)}
        for label, copy in (("owned_copies", lambda: owned_copies(grads)),
                            ("clone each", lambda: tuple(g.clone() for g in grads))):
            record[f"{label} device ms"] = time_gpu(copy).median_ms if gpu else None
            synchronize(device)
            start = time.perf_counter()
            for _ in range(HOST_CALLS):
                copy()
            record[f"{label} host us"] = (time.perf_counter() - start) / HOST_CALLS * 1e6
            synchronize(device)
        rows.append(record)
    return rows


def run_gpu_tests(deadline: float) -> dict:
    """``pytest tests/test_graphs_gpu.py`` in a subprocess (its own CUDA context and process group), cut at the
    deadline; its exit code, last line and output tail."""
    timeout = max(30.0, time_left(deadline))
    command = [sys.executable, "-m", "pytest", GPU_TESTS, "-q", "-p", "no:cacheprovider", "-rfs"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"returncode": None, "summary": f"cut off after {timeout:.0f} s", "tail": output[-4000:]}
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-60:])}


def run_graphs_section(results: Results, device: torch.device, deadline: float) -> dict:
    section = results.section("graphs")
    section["status"] = "done"
    rows = gradient_copy_cost(device)
    section["gradient_copy"] = rows
    columns = ["head", "tensors", "elements", "owned_copies device ms", "owned_copies host us",
               "clone each device ms", "clone each host us"]
    section["tables"].append(make_table(
        "Gradient copies per replay (PyTorch issue 181723): one multi-tensor copy vs a clone per gradient",
        columns, [[row[c] for c in columns] for row in rows]))
    results.flush()
    if device.type != "cuda":  # every test of the GPU module would skip: not worth a pytest process on a dry run
        Results.skip(section, GPU_TESTS, "needs a CUDA GPU")
        return section
    tests = run_gpu_tests(deadline)
    tests["outcome"] = "PASSED" if tests["returncode"] == 0 and "passed" in tests["summary"] else "FAILED"
    section["gpu_tests"] = tests
    section["notes"].append(f"{GPU_TESTS}: {tests['outcome']} ({tests['summary']})")
    return section
