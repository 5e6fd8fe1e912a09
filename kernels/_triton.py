"""Triton, or inert stand-ins when it does not import (CPU-only PyTorch builds ship without it).

The op modules define their ``@triton.jit`` kernels at import time; with the stand-ins those decorators leave the
functions untouched, so ``kernels`` (and its "torch" backend) still imports.  No kernel can launch then:
``resolve_backend`` refuses backend="triton" with a clear message when Triton does not import.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    TRITON_AVAILABLE = True
except Exception:  # pragma: no cover - any import failure (missing package, broken install) means: no Triton
    TRITON_AVAILABLE = False

    class _InertTriton:
        """Just enough of ``triton`` for the module-level decorators to run."""

        @staticmethod
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_args, **_kwargs):
            return lambda f: f

        @staticmethod
        def Config(*_args, **_kwargs):  # noqa: N802 - mirrors triton.Config
            return None

    triton = _InertTriton()
    tl = None

__all__ = ["TRITON_AVAILABLE", "triton", "tl"]
