"""The path a head's call runs ("eager torch", "graphed Triton", ...), as the kernels' one backend resolver
(``kernels._common.choose_backend``) answers for each op of the head, eagerly or inside a graph."""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels._common import backend_traits, device_traits, op_backends

PATHS = ("eager torch", "eager Triton", "eager Triton and torch", "graphed torch", "graphed Triton",
         "graphed Triton and torch")


def path_of(head: nn.Module, *, graphed: bool, like: torch.Tensor | None = None,
            device: torch.device | str | None = None) -> str:
    """The path of a call of the bare ``head``, eager or captured (``graphed``), on tensors like ``like``, or
    predicted without tensors for ``device`` (default: its parameters' device) and its parameters' dtype."""
    if like is not None:
        traits = backend_traits(like)
    else:
        reference = next(head.parameters(), None)
        dtype = reference.dtype if reference is not None else torch.float32
        device = device if device is not None else reference.device if reference is not None else "cpu"
        traits = device_traits(device, dtype)
    try:
        backends = set(op_backends(getattr(head, "backend", "torch"), traits, in_graph=graphed).values())
    except ValueError:  # backend "triton" that cannot run here: the head's call raises the same error
        backends = {"triton"}
    label = "Triton and torch" if backends == {"triton", "torch"} else "Triton" if backends == {"triton"} else "torch"
    return f"{'graphed' if graphed else 'eager'} {label}"
