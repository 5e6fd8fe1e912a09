"""Triton kernels for DiffKD's hot paths, each with a pure-PyTorch twin in ``kernels.reference``.

Importable on its own: nothing here imports ``diffkd``.  Every op takes ``backend=None|"auto"|"torch"|"triton"``
(see ``kernels._common.resolve_backend``).
"""
from kernels._common import BACKENDS, resolve_backend
from kernels.blend import noise_blend
from kernels.conv1x1 import conv1x1
from kernels.ddim import ddim_step, ddim_step_embed
from kernels.qsample import q_sample, squared_error_mean

__all__ = ["BACKENDS", "resolve_backend", "ddim_step", "ddim_step_embed", "noise_blend", "conv1x1", "q_sample",
           "squared_error_mean"]
