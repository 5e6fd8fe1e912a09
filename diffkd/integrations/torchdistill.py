"""DiffKD in torchdistill's registries, so that a torchdistill YAML config can name it.

Importing this module (a config's ``dependencies: [{name: diffkd.integrations.torchdistill}]`` does) registers:

- the auxiliary model wrapper ``DiffKDStudent``: the student plus the learnable DiffKD heads (a
  :class:`diffkd.DiffKDLoss`), so that torchdistill's optimizer, which trains the student's modules, trains the heads
  too.  Its ``kwargs`` are DiffKDLoss's: ``channels: {name: [student C, teacher C]}``, ``vectors``, ``weights``,
  ``head_options``, ``graph`` and any DiffKDHead argument (``inference_steps``, ``use_anm``, ...);
- the mid-level loss ``DiffKDLoss``: for each pair of ``feature_pairs`` it reads the student's and the teacher's
  tensors from torchdistill's I/O dicts (``{path, io}``, as torchdistill's own feature losses do; path ``'.'`` is
  the model's output) and returns the heads' weighted loss;
- the model factory ``diffkd_model``: :func:`diffkd.models.create_model` (the CIFAR zoo by the benchmark's names,
  with ``checkpoint:`` for a benchmark teacher file, or any timm model).

A DiffKD head needs the student's and the teacher's feature at once, but torchdistill hands a student wrapper only
the student's I/O dict; so the wrapper's ``secondary_forward`` puts its heads into that dict under
:data:`HEADS_ENTRY`, and the loss, which sees both dicts, calls them.  One config shows all of it:
``configs/torchdistill/resnet8x4_from_resnet32x4.yaml``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchdistill.losses.registry import register_mid_level_loss
from torchdistill.models.registry import register_auxiliary_model_wrapper, register_model
from torchdistill.models.util import wrap_if_distributed
from torchdistill.models.wrapper import AuxiliaryModelWrapper

from diffkd.loss import DiffKDLoss
from diffkd.models.factory import create_model

# The student I/O dict entry through which the wrapper hands its heads to the loss (not a module path, so no hook
# of the config can collide with it).
HEADS_ENTRY = "diffkd:heads"
WRAPPER_KEY, LOSS_KEY, MODEL_KEY = "DiffKDStudent", "DiffKDLoss", "diffkd_model"
SIDES = ("student", "teacher")

register_model(key=MODEL_KEY)(create_model)


@register_auxiliary_model_wrapper(key=WRAPPER_KEY)
class DiffKDStudent(AuxiliaryModelWrapper):
    """The student and its DiffKD heads.  ``forward`` is the student's; the heads run in the ``DiffKDLoss`` loss.

    Forward hooks on the student's modules go through the attribute ``student_model`` (``student_model.layer3``).
    In distributed training the student and the heads are each wrapped in DDP, as torchdistill's own wrappers do.
    """

    def __init__(self, student_model: nn.Module, channels: Mapping[str, Sequence[int]], device: torch.device,
                 device_ids, distributed: bool, find_unused_parameters: bool | None = None,
                 vectors: Sequence[str] = (), weights: Mapping[str, float] | None = None,
                 head_options: Mapping[str, Mapping[str, Any]] | None = None, graph: str | bool = "auto",
                 **head_kwargs):
        super().__init__()
        heads = DiffKDLoss({name: tuple(pair) for name, pair in channels.items()}, vectors=vectors,
                           weights=weights, head_options=head_options, graph=graph, **head_kwargs)
        self.student_model = wrap_if_distributed(student_model, device, device_ids, distributed,
                                                 find_unused_parameters)
        self.diffkd = wrap_if_distributed(heads, device, device_ids, distributed, find_unused_parameters)

    def forward(self, x):
        return self.student_model(x)

    def secondary_forward(self, io_dict: dict) -> None:
        io_dict[HEADS_ENTRY] = {"heads": self.diffkd}


def _feature(io_dict: Mapping, side: str, name: str, where: Mapping[str, str]) -> torch.Tensor:
    path, io = where["path"], where.get("io", "output")
    if path not in io_dict or io not in io_dict[path]:
        hook_path = path if side == "teacher" else f"{path} (through the wrapper, e.g. student_model.layer3)"
        raise ValueError(f"DiffKDLoss pair {name!r}: the {side}'s I/O dict has no {io!r} of {path!r}; list "
                         f"{hook_path} under the {side}'s forward_hook: {io} in the config ('.' is the model's "
                         f"output and needs no hook)")
    return io_dict[path][io]


@register_mid_level_loss(key=LOSS_KEY)
class DiffKDMidLevelLoss(nn.Module):
    """The DiffKD heads' loss on torchdistill's I/O dicts (the heads live in the ``DiffKDStudent`` wrapper).

    ``feature_pairs``: ``{name: {student: {path, io}, teacher: {path, io}}}``, one entry per pair of the wrapper's
    ``channels``.  :attr:`last_terms` keeps the latest step's detached per-head terms (``<name>/kd_loss``,
    ``<name>/diffusion_loss``, ``<name>/gamma``, ...) for logging, since torchdistill's losses return one number.
    """

    def __init__(self, feature_pairs: Mapping[str, Mapping[str, Mapping[str, str]]], **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"DiffKDLoss takes only feature_pairs (the heads' settings belong to the "
                             f"{WRAPPER_KEY} wrapper's kwargs), got {sorted(kwargs)}")
        if not isinstance(feature_pairs, Mapping) or not feature_pairs:
            raise ValueError("DiffKDLoss needs feature_pairs: {name: {student: {path, io}, teacher: {path, io}}}")
        for name, pair in feature_pairs.items():
            if not isinstance(pair, Mapping) or any(not isinstance(pair.get(side), Mapping)
                                                    or "path" not in pair[side] for side in SIDES):
                raise ValueError(f"DiffKDLoss pair {name!r}: expected {{student: {{path, io}}, teacher: {{path, io}}}}"
                                 f", got {pair!r}")
        self.feature_pairs = {name: dict(pair) for name, pair in feature_pairs.items()}
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, student_io_dict: Mapping, teacher_io_dict: Mapping, *args, **kwargs) -> torch.Tensor:
        if HEADS_ENTRY not in student_io_dict:
            raise ValueError(f"DiffKDLoss found no DiffKD heads: give the student the auxiliary_model_wrapper "
                             f"{{key: {WRAPPER_KEY}}} (it holds the heads and hands them to this loss)")
        heads = student_io_dict[HEADS_ENTRY]["heads"]
        features = {side: {name: _feature(io_dict, side, name, pair[side]) for name, pair in self.feature_pairs.items()}
                    for side, io_dict in zip(SIDES, (student_io_dict, teacher_io_dict))}
        out = heads(features["student"], features["teacher"])
        self.last_terms = {key: value for key, value in out.items() if key != "loss"}
        return out["loss"]

    def __str__(self) -> str:
        return f"{LOSS_KEY}(pairs={list(self.feature_pairs)})"
