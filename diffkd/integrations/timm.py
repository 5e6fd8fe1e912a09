"""DiffKD as a timm training task: :class:`DiffKDTask`, a ``timm.task.TrainingTask``.

timm's ``train.py`` drives a task: ``result = task(input, target)``, ``result["loss"].backward()``, the optimizer
over ``task.get_trainable_module()``, ``task.setup_ema()`` / ``task.update_ema()``, ``task.prepare_distributed()``
and checkpoints from ``task.get_checkpoint_state()``.  :class:`DiffKDTask` takes the arguments of timm's
``FeatureDistillationTask`` (build it where ``train.py`` builds that task) plus DiffKD's settings, and distils named features (and the logits) of the teacher into
the student through :class:`diffkd.DiffKDLoss`::

    task = DiffKDTask(student, "resnet50", criterion=nn.CrossEntropyLoss(), features=["layer4"], nfe=5)
    optimizer = timm.optim.create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.1)
    result = task(images, labels)   # loss, output, task_loss, kd_loss, layer4/kd_loss, logits/gamma, ...
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

try:
    from timm.task import DistillationTeacher, TrainingTask, resolve_classification_loss
    from timm.task.distillation import FeatureDistillationTrainableModule
except ImportError as error:  # older timm has no timm.task, or an earlier form of it
    raise ImportError(f"diffkd.integrations.timm needs the task API of timm >= 1.0.31 ({error}); run "
                      f"pip install -U 'timm>=1.0.31' (or pip install -e '.[integrations]')") from error
from timm.utils import unwrap_model

from diffkd.loss import DiffKDLoss
from diffkd.models.taps import FeatureTaps, default_taps, infer_input_size

_logger = logging.getLogger(__name__)

LOGITS = "logits"     # the pair that distils the models' outputs
FEATURE = "feature"   # the pair of the default feature taps (the last feature map before pooling)


def resolve_loss_weights(distill_loss_weight: float | None, task_loss_weight: float | None) -> tuple[float, float]:
    """(task weight, distill weight) by timm's rule: both given → as given; only the distill weight → task 1;
    only the task weight → distill = 1 − task (complementary); neither → 1 and 1."""
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else task_loss_weight), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0


def feature_pairs(features: None | str | Sequence[str] | Mapping[str, tuple[str, str]], student: nn.Module,
                  teacher: nn.Module, input_size: Sequence[int], logit_head: bool) -> dict[str, tuple]:
    """{pair name: (student tap, teacher tap)}; None taps are the models' outputs (the logit head's pair).

    ``features``: None → each model's last feature map before pooling (:func:`diffkd.models.default_taps`) as
    the pair "feature"; a tap name or a list of them → the same module in both models, named by the tap; a
    mapping → {name: (student tap, teacher tap)} as given.
    """
    if features is None:
        pairs = {FEATURE: (default_taps("student", student, input_size)[0],
                           default_taps("teacher", teacher, input_size)[0])}
    elif isinstance(features, str):
        pairs = {features: (features, features)}
    elif isinstance(features, Mapping):
        pairs = {name: tuple(pair) for name, pair in features.items()}
    else:
        pairs = {tap: (tap, tap) for tap in features}
    if logit_head:
        if LOGITS in pairs:
            raise ValueError(f"the pair name {LOGITS!r} is the logit head's; name that feature pair otherwise, or "
                             f"pass logit_head=False")
        pairs[LOGITS] = (None, None)
    if not pairs:
        raise ValueError("nothing to distil: features=[] and logit_head=False; name at least one feature tap or "
                         "keep the logit head")
    return pairs


def _normalization(model: nn.Module, device, dtype) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The (mean, std) of timm's pretrained config as 1×C×1×1 tensors; (None, None) for a model without one."""
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        return None, None
    return tuple(torch.tensor(cfg[key], device=device, dtype=dtype).view(1, -1, 1, 1) for key in ("mean", "std"))


class DiffKDTrainableModule(FeatureDistillationTrainableModule):
    """The student and the DiffKD heads: everything trainable, in one module for DDP and the optimizer.

    Built on timm's feature-distillation module (without its projection), so timm's optimizer factory treats it
    alike: the student's ``no_weight_decay`` names and layer-decay groups hold, the heads join the last group.
    ``forward(input, teacher_features)`` runs the student with its taps and the heads, and returns
    (student logits, :class:`diffkd.DiffKDLoss`'s output).
    """

    def __init__(self, student_model: nn.Module, diffkd: DiffKDLoss):
        super().__init__(student_model, projection=None)
        self.diffkd = diffkd
        self.student_taps = [pair[0] for pair in diffkd.taps.values() if pair[0] is not None]

    def forward(self, input: torch.Tensor, teacher_features: Mapping[str, torch.Tensor]):
        with FeatureTaps(self.student, self.student_taps) as taps:
            logits = self.student(input)
            features = taps.features()
        return logits, self.diffkd(self.diffkd.pair_inputs("student", features, logits), teacher_features)


class DiffKDTask(TrainingTask):
    """DiffKD distillation as a timm training task (the constructor of timm's ``FeatureDistillationTask``).

    ``loss = task_loss_weight · criterion(student logits, target) + distill_loss_weight · kd_loss`` with timm's
    weighting rule (:func:`resolve_loss_weights`); ``kd_loss`` is :class:`diffkd.DiffKDLoss`'s weighted sum over
    its heads (each head's KD, diffusion and autoencoder terms).  ``forward`` returns timm's dict — ``loss``,
    ``output`` (student logits), ``task_loss``, ``kd_loss`` — and every head's detached terms
    (``<pair>/kd_loss``, ``<pair>/diffusion_loss``, ``<pair>/gamma``, ...).

    DiffKD's settings (defaults: the paper's CIFAR-100 recipe):

    - ``features``: what to distil besides the logits — None (the last feature map before pooling of each
      model), a module name or list of names present in both models (``["layer3", "layer4"]``), or
      ``{name: (student module, teacher module)}``.  Vision-transformer tokens become maps (class tokens dropped).
    - ``logit_head``: also distil the logits with the paper's logit head (KL, τ = ``temperature``).
    - ``nfe``: denoising steps; ``anm``: adaptive noise matching; ``ae_channels``: the feature heads' autoencoder
      width (0: none; the paper uses 1024 on ImageNet); ``diffusion_weight`` / ``ae_weight``: those terms' weights
      inside each head; ``head_options``: one pair's :class:`diffkd.DiffKDHead` arguments, overriding these.
    - ``graph``: CUDA-graph each head ("auto": where CUDA is available); ``backend``: the heads' kernels.
    - ``input_size``: (C, H, W) of the dry forward that measures channels (inferred when omitted).

    The teacher is a timm model name (created with pretrained weights, as timm does), a module, or a
    ``timm.task.DistillationTeacher``; it stays frozen, in eval mode, and out of DDP.  Its input is renormalised
    from the student's pretrained-config mean/std to its own, as timm's distillation tasks do (a student without a
    pretrained config, e.g. of the CIFAR zoo, hands its input over unchanged).
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: str | nn.Module | DistillationTeacher,
            criterion: nn.Module | None = None,
            criterion_kwargs: dict[str, Any] | None = None,
            teacher_pretrained_path: str | None = None,
            teacher_pretrained_cfg_overlay: dict[str, Any] | None = None,
            distill_loss_weight: float | None = None,
            task_loss_weight: float | None = None,
            *,
            features: None | str | Sequence[str] | Mapping[str, tuple[str, str]] = None,
            logit_head: bool = True,
            nfe: int = 5,
            anm: bool = True,
            ae_channels: int = 0,
            temperature: float = 1.0,
            diffusion_weight: float = 1.0,
            ae_weight: float = 1.0,
            head_options: Mapping[str, Mapping[str, Any]] | None = None,
            graph: str | bool = "auto",
            backend: str = "auto",
            input_size: Sequence[int] | None = None,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if isinstance(teacher_model, DistillationTeacher):
            self.teacher = teacher_model
        else:
            student = unwrap_model(student_model)
            self.teacher = DistillationTeacher(
                teacher_model, num_classes=student.num_classes, in_chans=getattr(student, "in_chans", 3),
                pretrained_path=teacher_pretrained_path, pretrained_cfg_overlay=teacher_pretrained_cfg_overlay,
                device=self.device, dtype=self.dtype)
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.task_loss_weight, self.distill_loss_weight = resolve_loss_weights(distill_loss_weight, task_loss_weight)

        input_size = tuple(input_size) if input_size is not None else infer_input_size(student_model)
        pairs = feature_pairs(features, student_model, self.teacher.model, input_size, logit_head)
        if not isinstance(ae_channels, int) or isinstance(ae_channels, bool) or ae_channels < 0:
            raise ValueError(f"ae_channels must be an integer >= 0 (0 = no autoencoder), got {ae_channels!r}")
        autoencoder = dict(use_ae=True, ae_channels=ae_channels) if ae_channels else {}
        options = {name: dict(autoencoder) for name, pair in pairs.items() if pair != (None, None)}
        for name, extra in (head_options or {}).items():
            options.setdefault(name, {}).update(extra)
        sample = torch.zeros(1, *input_size, device=self.device, dtype=self.dtype)
        diffkd = DiffKDLoss.from_models(
            student_model, self.teacher.model, pairs, sample, graph=graph, head_options=options,
            inference_steps=nfe, use_anm=anm, temperature=temperature, diffusion_weight=diffusion_weight,
            ae_weight=ae_weight, backend=backend).to(self.device)
        self.trainable_module = DiffKDTrainableModule(student_model, diffkd)
        self.teacher_taps = [pair[1] for pair in pairs.values() if pair[1] is not None]

        student_mean, student_std = _normalization(student_model, self.device, self.dtype)
        self.register_buffer("student_mean", student_mean, persistent=False)
        self.register_buffer("student_std", student_std, persistent=False)
        if self.verbose:
            _logger.info(f"DiffKDTask: pairs {pairs}; task_weight={self.task_loss_weight}, "
                         f"distill_weight={self.distill_loss_weight}; the heads add "
                         f"{diffkd.extra_parameter_count():,} training-only parameters")

    def train(self, mode: bool = True) -> DiffKDTask:
        """Set the training mode of the trainable parts; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def diffkd(self) -> DiffKDLoss:
        """The heads (the :class:`diffkd.DiffKDLoss` inside the trainable module, under any DDP wrapper)."""
        return unwrap_model(self.trainable_module).diffkd

    def teacher_features(self, input: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's side of every pair for ``input`` (the student's input; renormalised for the teacher)."""
        with torch.no_grad(), FeatureTaps(self.teacher.model, self.teacher_taps) as taps:
            teacher_input = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            logits = self.teacher(teacher_input.detach())
            return self.diffkd.pair_inputs("teacher", taps.features(), logits)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_features = self.teacher_features(input)
        logits, distilled = self.trainable_module(input, teacher_features)
        task_loss = self.criterion(logits, target)
        kd_loss = distilled.pop("loss")
        return {"loss": self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss, "output": logits,
                "task_loss": task_loss, "kd_loss": kd_loss, **distilled}

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> DiffKDTask:
        """Wrap the student and the heads in DistributedDataParallel; the frozen teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile the student for evaluation.  Training stays eager: the taps are forward hooks, and the heads
        run their own fused kernels (and CUDA graphs)."""
        self.eval_model = torch.compile(unwrap_model(self.trainable_module).student, backend=backend, mode=mode,
                                        **compile_kwargs)
        if self.verbose:
            _logger.info("DiffKDTask.compile: the student's evaluation forward is compiled; training runs eagerly")
        return self.eval_model

    # ---- EMA, evaluation and checkpoints: the student is the model, the heads are task state -----------------
    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        resolved = super().get_eval_model(module=module, ema=ema)
        current = resolved
        while current is not None:   # through EMA / DDP / compile wrappers to the student
            if isinstance(current, DiffKDTrainableModule):
                return current.student
            current = getattr(current, "module", getattr(current, "_orig_mod", None))
        return resolved

    def _trainable(self, module: nn.Module | None, ema: bool) -> DiffKDTrainableModule | None:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        return None if module is None else unwrap_model(module)

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        trainable = self._trainable(module, ema)
        return {} if trainable is None else {"diffkd": trainable.diffkd.state_dict()}

    def load_task_state(self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None,
                        ema: bool = False) -> None:
        if not state:   # a student-only checkpoint (initial weights, a legacy file): the heads start afresh
            _logger.warning("DiffKDTask: the checkpoint holds no DiffKD head state; the heads start afresh")
            return
        if "diffkd" not in state:
            raise RuntimeError(f"the checkpoint's task state holds {sorted(state)}, not the DiffKD heads ('diffkd'): "
                               f"it was written by another task")
        trainable = self._trainable(module, ema)
        if trainable is None:
            raise RuntimeError("cannot load the EMA task state before setup_ema()" if ema
                               else "cannot load task state without a trainable module")
        trainable.diffkd.load_state_dict(state["diffkd"], strict=strict)

    def get_clip_parameters(self, exclude_head: bool = False) -> list[nn.Parameter]:
        trainable = unwrap_model(self.trainable_module)
        parameters = list(trainable.student.parameters())
        if exclude_head:
            parameters = parameters[:-2]
        return parameters + list(trainable.diffkd.parameters())
