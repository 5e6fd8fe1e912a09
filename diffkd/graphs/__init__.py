"""CUDA graphs of DiffKD heads: ``CUDAGraphHead`` (the wrapper; its module documentation is the contract), the
step comparison its self-check and the benchmarks use, the CUDA runtime seam and the path a head runs.

Parts: ``head`` (the wrapper, ``head_path``), ``compare`` (``record_step``, ``compare_steps``), ``runtime`` (the
CUDA calls, gradient ownership), ``keys`` (what a capture bakes in), ``paths`` (what the kernels' resolver runs),
``state_dict`` (the bare head's keys).
"""
from diffkd.graphs.compare import (SELF_CHECK_TOLERANCE, GraphingFailed, StepRecord, buffer_error, compare_steps,
                                   gradient_error, record_step, relative_error)
from diffkd.graphs.head import MAX_GRAPHS, WARMUP_ITERATIONS, CUDAGraphHead, head_path
from diffkd.graphs.paths import PATHS, path_of
from diffkd.graphs.runtime import CAPTURE_ERROR_MODE, CudaGraphRuntime, OwnedGradients, owned_copies

__all__ = ["CUDAGraphHead", "head_path", "path_of", "PATHS", "relative_error", "compare_steps", "record_step",
           "StepRecord", "gradient_error", "buffer_error", "GraphingFailed", "SELF_CHECK_TOLERANCE", "MAX_GRAPHS",
           "WARMUP_ITERATIONS", "CudaGraphRuntime", "OwnedGradients", "owned_copies", "CAPTURE_ERROR_MODE"]
