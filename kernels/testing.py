"""Checking the kernels against the float64 reference: shared by the tests and ``benchmarks/parity.py``.

``compare_with_fp64`` runs an op and its reference twin, and measures every output and every gradient against the
reference run on float64 copies of the inputs.  Two bounds:
- "relative" (fp32 with IEEE math, fp64): |got − ref| ≤ rtol·(|ref| + max|ref|) + atol elementwise — relative to
  the element and to the tensor's scale, since a sum of many terms has absolute error ~ eps·max|ref|;
- "twice torch" (fp16, bf16, and fp32 with TF32): max|got − ref| ≤ 2·max|torch − ref| + atol, where "torch" is
  the reference run in the same dtype and math mode — flash-attention's bound, which scales with dtype and size.
``philox_normal`` is an independent (numpy) oracle of the noise the kernels draw in-kernel (``kernels._noise``).
"""
from __future__ import annotations

import numpy as np
import torch

from kernels._common import interpreter_enabled

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def outputs_and_grads(fn, inputs, cotangents=None):
    """(outputs, gradients of Σ cotangent·output w.r.t. every input that requires grad, cotangents)."""
    outputs = _as_tuple(fn(*inputs))
    if cotangents is None:
        cotangents = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outputs]
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outputs, wanted, [c.to(o.dtype) for c, o in zip(cotangents, outputs)])
    return outputs, grads, cotangents


def recast(inputs, dtype):
    """Detached copies of the floating-point inputs in ``dtype`` (keeping requires_grad); others as they are."""
    def one(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().to(dtype).requires_grad_(t.requires_grad)
        return t
    return [one(t) for t in inputs]


def compare_with_fp64(kernel_fn, reference_fn, inputs, *, twice_torch: bool | None = None, rtol: float = 1e-5,
                      atol: float = 1e-7, low_precision_atol: float = 1e-3) -> list[dict]:
    """One record per output and gradient: name, max error vs fp64, the bound, and whether it holds.

    ``twice_torch`` picks the bound (default: for fp16/bf16 inputs); the torch run for it uses the inputs' dtype
    and whatever math mode (TF32 flags) is current.
    """
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    if twice_torch is None:
        twice_torch = dtype in LOW_PRECISION
    outputs, grads, cotangents = outputs_and_grads(kernel_fn, inputs)
    ref_outputs, ref_grads, _ = outputs_and_grads(reference_fn, recast(inputs, torch.float64), cotangents)
    names = [f"output {i}" for i in range(len(outputs))] + [f"grad {i}" for i in range(len(grads))]
    records = []
    if twice_torch:
        torch_outputs, torch_grads, _ = outputs_and_grads(reference_fn, recast(inputs, dtype), cotangents)
        for name, got, ref, low in zip(names, outputs + grads, ref_outputs + ref_grads, torch_outputs + torch_grads):
            error = (got.double() - ref).abs().max().item()
            torch_error = (low.double() - ref).abs().max().item()
            # Triton's interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest): one more ulp.
            truncating = got.dtype == torch.bfloat16 and interpreter_enabled()
            slack = torch.finfo(torch.bfloat16).eps * ref.abs().max().item() if truncating else 0.0
            bound = 2 * torch_error + slack + low_precision_atol
            records.append({"name": name, "dtype": str(got.dtype), "torch_dtype": str(low.dtype), "max_error": error,
                            "torch_error": torch_error, "bound": bound,
                            "passed": got.dtype == low.dtype and error <= bound})
        return records
    for name, got, ref in zip(names, outputs + grads, ref_outputs + ref_grads):
        difference = (got.double() - ref).abs()
        tolerance = rtol * (ref.abs() + ref.abs().max()) + atol
        records.append({"name": name, "dtype": str(got.dtype), "max_error": difference.max().item(),
                        "worst_error_over_tolerance": (difference / tolerance).max().item(),
                        "passed": bool((difference <= tolerance).all())})
    return records


# ---- an independent oracle of the in-kernel noise: Triton's Philox 4×32-10 + Box–Muller, in numpy -------------
_PHILOX_KEY_A, _PHILOX_KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_PHILOX_ROUND_A, _PHILOX_ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)


def _mul_hi_lo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    product = a * b.astype(np.uint64)
    return (product >> np.uint64(32)).astype(np.uint32), (product & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _to_uniform(x: np.ndarray) -> np.ndarray:
    signed = x.view(np.int32)
    signed = np.where(signed < 0, ~signed, signed)
    return signed.astype(np.float32) * np.float32(4.6566127342e-10)


def philox_normal(seed: int, shape) -> torch.Tensor:
    """The documented in-kernel noise, in float64 on the CPU: element i (row-major) is tl.randn(seed, i)."""
    count = int(np.prod(shape))
    c0 = np.arange(count, dtype=np.uint32)
    c1 = np.zeros(count, np.uint32)
    c2 = np.zeros(count, np.uint32)
    c3 = np.zeros(count, np.uint32)
    seed64 = np.uint64(seed % 2 ** 64)
    k0, k1 = np.uint32(seed64 & np.uint64(0xFFFFFFFF)), np.uint32(seed64 >> np.uint64(32))
    with np.errstate(over="ignore"):
        for _ in range(10):
            hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
            hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
            c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
            k0, k1 = k0 + _PHILOX_KEY_A, k1 + _PHILOX_KEY_B
    u1 = np.maximum(np.float32(1e-7), _to_uniform(c0))
    u2 = _to_uniform(c1)
    normal = np.sqrt(-2.0 * np.log(u1.astype(np.float64))) * np.cos(2 * np.pi * u2.astype(np.float64))
    return torch.from_numpy(normal).reshape(tuple(shape))
