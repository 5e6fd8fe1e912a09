"""Triton kernels for DiffKD's hot paths, each with a pure-PyTorch twin in ``kernels.reference``.

Importable on its own: nothing here imports ``diffkd``.  Every op takes ``backend=None|"auto"|"torch"|"triton"``
(see ``kernels._common``); ``auto_uses_triton()`` makes "auto" resolve as it does during CUDA-graph capture.
"""
from kernels._common import BACKENDS, auto_uses_triton, resolve_backend
from kernels.blend import noise_blend
from kernels.conv1x1 import conv1x1
from kernels.ddim import ddim_step, ddim_step_embed
from kernels.qsample import q_sample, squared_error_mean

# Marks this package as diffkd's: Hugging Face's unrelated ``kernels`` package has the same top-level name, and
# ``import diffkd`` checks for this marker (diffkd/_kernels_check.py).
__diffkd_kernels__ = True

__all__ = ["BACKENDS", "resolve_backend", "auto_uses_triton", "ddim_step", "ddim_step_embed", "noise_blend",
           "conv1x1", "q_sample", "squared_error_mean"]
