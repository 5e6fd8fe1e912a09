"""What a capture bakes in, as the key of a captured graph pair: a call whose key differs is captured anew.

A graph replays fixed kernels on fixed memory with the constants of its capture, so its key holds:
- each feature's shape, strides (memory format), dtype, device and ``requires_grad``;
- the autocast state and dtype, and the TF32 flags (they choose the kernels);
- the parameters' ``requires_grad`` (a parameter frozen at capture gets no gradient from the replay);
- every submodule's plain Python settings, read from its attributes: the ``training`` flag (BatchNorm's batch
  statistics or running ones) and the head's weights, temperature, number of steps (NFE), DDIM coefficients,
  backend, distance, ... (captured as constants).
"""
from __future__ import annotations

from operator import attrgetter
from typing import NamedTuple

import torch
import torch.nn as nn

_SCALARS = (bool, int, float, str, type(None))


class GraphKey(NamedTuple):
    features: tuple  # per feature: (shape, strides, dtype, device, requires_grad)
    autocast: torch.dtype | None
    tf32: tuple[bool, bool]
    trainable: tuple[bool, ...]  # each parameter's requires_grad
    settings: tuple  # every submodule's plain Python settings (values), the training flag among them


def _is_setting(value) -> bool:
    """A plain Python setting: a scalar, or a list / tuple of scalars."""
    return isinstance(value, _SCALARS) or (isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS)
                                                                                   for v in value))


class KeyReader:
    """Reads the GraphKey of a call of ``head``.  Which attributes of which submodules are settings is found once,
    here (a wrapper is built after its head), so that a call only reads their values: a few µs, not a walk over
    every attribute of every submodule."""

    def __init__(self, head: nn.Module):
        self.parameters = tuple(head.parameters())
        self.scalars, self.sequences = [], []  # (module, attrgetter of its scalar settings), (module, name)
        for module in head.modules():
            names = [name for name, value in vars(module).items() if _is_setting(value)]
            scalars = [name for name in names if isinstance(getattr(module, name), _SCALARS)]
            self.scalars.append((module, attrgetter(*scalars)))  # every module has its training flag
            self.sequences += [(module, name) for name in names if name not in scalars]

    def settings(self) -> tuple:
        return (tuple(get(module) for module, get in self.scalars)
                + tuple(tuple(getattr(module, name)) for module, name in self.sequences))

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> GraphKey:
        device_type = student.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return GraphKey(tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)
                              for t in (student, teacher)),
                        autocast, (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
                        tuple(p.requires_grad for p in self.parameters), self.settings())


def describe(key: GraphKey) -> str:
    (s_shape, _, s_dtype, device, s_grad), (t_shape, _, t_dtype, _, _) = key.features
    frozen = key.trainable.count(False)
    return (f"student {list(s_shape)} {str(s_dtype).replace('torch.', '')}"
            f"{' (requires grad)' if s_grad else ''}, teacher {list(t_shape)} "
            f"{str(t_dtype).replace('torch.', '')}, {device}"
            + (f", autocast {str(key.autocast).replace('torch.', '')}" if key.autocast is not None else "")
            + (f", {frozen} frozen parameters" if frozen else ""))
