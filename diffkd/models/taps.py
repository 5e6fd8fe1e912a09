"""Feature taps: tensors captured by module name with forward hooks, without changing the model.

A *tap* is a string: ``"layer4"`` captures the output of the module ``layer4``; ``"pool4:input"`` captures the
first input of ``pool4`` (for a map that no module outputs, e.g. one a functional ReLU produced).  A module that
returns a dict, tuple or list is tapped at one entry with a trailing ``[key]``: ``"backbone[0]"`` is entry ``"0"``
of a torchvision detector's FPN (an OrderedDict of levels), ``"encoder[2]"`` the third element of a tuple, and
``"fpn:input[0]"`` an entry of a module's first input (:func:`entry_tap` writes these names).  Channels
and sizes come from one dry forward pass (:func:`probe_taps`), never from a hand-kept table, and
:func:`default_taps` finds the last feature map before pooling and the logits by tracing one forward of any
model that splits its forward like timm's (``forward_head(forward_features(x))``) — timm's models and the
CIFAR zoo.

Token outputs are turned into maps: a ViT's B×N×C tokens lose their class (prefix) tokens and become B×C×h×w;
the B×H×W×C maps of models whose ``output_fmt`` is ``"NHWC"`` (timm's Swin) are permuted to B×C×H×W.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models.checkpoint import describe_architecture, unwrap_model
from diffkd.models.cifar import CifarNet

INPUT_SUFFIX = ":input"
# module name, optional ":input", optional "[key]" (one entry of a dict / tuple / list the module returns or takes)
_TAP_PATTERN = re.compile(r"(?P<module>[^\[\]]+?)(?P<input>:input)?(?:\[(?P<key>[^\[\]]+)\])?")
CIFAR_IMAGE_SIZE = (32, 32)


# ---- token and spatial adaptation ---------------------------------------------------------------------------
def tokens_to_map(x: torch.Tensor, num_prefix_tokens: int | None = None) -> torch.Tensor:
    """B×N×C tokens → B×C×h×w, or a channels-last B×H×W×C map → B×C×H×W (a permuted view).

    Tokens: with ``num_prefix_tokens=None`` a square N is kept whole and N − 1 square drops the first (class)
    token; otherwise exactly ``num_prefix_tokens`` leading tokens are dropped (ViTs with register tokens).
    """
    if x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    if x.dim() != 3:
        raise ValueError(f"tokens_to_map expects B×N×C tokens or a channels-last B×H×W×C map, got shape "
                         f"{tuple(x.shape)}")
    num_tokens = x.shape[1]
    if num_prefix_tokens is None:
        for prefix in (0, 1):
            if num_tokens > prefix and math.isqrt(num_tokens - prefix) ** 2 == num_tokens - prefix:
                num_prefix_tokens = prefix
                break
        else:
            raise ValueError(f"cannot arrange {num_tokens} tokens (shape {tuple(x.shape)}) on a square grid: neither "
                             f"N = {num_tokens} nor N − 1 is a perfect square. Pass num_prefix_tokens= (e.g. for "
                             f"class + register tokens) or tap a module that outputs a spatial map")
    grid_tokens = num_tokens - num_prefix_tokens
    side = math.isqrt(max(grid_tokens, 0))
    if grid_tokens < 1 or side * side != grid_tokens:
        raise ValueError(f"after dropping {num_prefix_tokens} prefix token(s), {grid_tokens} of the {num_tokens} "
                         f"tokens remain, which is not a square grid (shape {tuple(x.shape)})")
    grid = x[:, num_prefix_tokens:]
    return grid.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def to_feature_map(x: torch.Tensor, *, channels_last: bool = False,
                   num_prefix_tokens: int | None = None) -> torch.Tensor:
    """A tapped tensor in the layout a DiffKD head takes: maps B×C×H×W, tokens as maps, vectors B×K as they are."""
    if x.dim() == 2 or (x.dim() == 4 and not channels_last):
        return x
    if x.dim() in (3, 4):
        return tokens_to_map(x, num_prefix_tokens)
    raise ValueError(f"a tapped tensor of shape {tuple(x.shape)} is neither a map, tokens nor a vector")


def _spatial_size(shape: Sequence[int], who: str) -> tuple[int, int]:
    if len(shape) != 4:
        raise ValueError(f"the {who} feature must be a B×C×H×W map, got shape {tuple(shape)}")
    return int(shape[2]), int(shape[3])


def _common_size(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> tuple[int, int]:
    student_hw = _spatial_size(student_shape, "student")
    teacher_hw = _spatial_size(teacher_shape, "teacher")
    return min(student_hw[0], teacher_hw[0]), min(student_hw[1], teacher_hw[1])


def match_spatial(student_map: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student map, teacher map) at their common (smaller) size: the larger map is average-pooled (adaptive).

    A DiffKD head stays strict (the paper does not say how maps of different sizes meet), so DiffKDLoss pools
    the larger map down, e.g. a ResNet32x4 teacher's 8×8 map to a ShuffleNet student's 4×4; nothing is upsampled.
    Maps of equal size are returned untouched.
    """
    size = _common_size(student_map.shape, teacher_map.shape)
    return tuple(x if tuple(x.shape[2:]) == size else F.adaptive_avg_pool2d(x, size)
                 for x in (student_map, teacher_map))


def describe_spatial_match(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> str | None:
    """A start-up line saying which map :func:`match_spatial` pools and to what size; None when sizes agree.

    Takes shapes, e.g. from :func:`probe_taps`.
    """
    size = _common_size(student_shape, teacher_shape)
    pooled = []
    for who, shape in (("student", student_shape), ("teacher", teacher_shape)):
        hw = tuple(shape[2:])
        if hw != size:
            overlap = any(side % target for side, target in zip(hw, size))
            windows = " (not a multiple: neighbouring pooling windows overlap)" if overlap else ""
            pooled.append(f"the {who}'s {'×'.join(map(str, hw))} feature map{windows}")
    if not pooled:
        return None
    return (f"{' and '.join(pooled)} {'is' if len(pooled) == 1 else 'are'} average-pooled to "
            f"{'×'.join(map(str, size))} before the DiffKD head")


# ---- hooks by module name --------------------------------------------------------------------------------------
def entry_tap(module_name: str, key: str | int, *, on_input: bool = False) -> str:
    """The tap of one entry of what ``module_name`` returns (or, with ``on_input``, takes): ``"backbone[0]"``."""
    return f"{module_name}{INPUT_SUFFIX if on_input else ''}[{key}]"


def _parse_tap(tap: str) -> tuple[str, bool, str | None]:
    """(module name, whether the input is tapped, entry key or None)."""
    match = _TAP_PATTERN.fullmatch(tap) if isinstance(tap, str) else None
    if match is None:
        raise ValueError(f"a tap is a module name, optionally followed by '{INPUT_SUFFIX}' and/or one '[key]' "
                         f"(an entry of a dict / tuple output, e.g. 'backbone[0]'), got {tap!r}")
    return match["module"], match["input"] is not None, match["key"]


def _select_entry(tap: str, value, key: str | None):
    """``value[key]`` for a tap with ``[key]``: a dict entry (by string, or by integer for int-keyed dicts) or a
    tuple / list element."""
    if key is None:
        return value
    if isinstance(value, Mapping):
        if key in value:
            return value[key]
        if key.lstrip("-").isdigit() and int(key) in value:
            return value[int(key)]
        entries = ", ".join(repr(entry) for entry in value)
        raise ValueError(f"tap {tap!r}: the tapped dict has no entry {key!r}; its entries are: {entries}")
    if isinstance(value, (tuple, list)):
        if not key.lstrip("-").isdigit() or not -len(value) <= int(key) < len(value):
            raise ValueError(f"tap {tap!r}: the tapped {type(value).__name__} has {len(value)} elements; "
                             f"[{key}] is not an index into it")
        return value[int(key)]
    raise ValueError(f"tap {tap!r}: the tapped value is a {type(value).__name__}, not a dict, tuple or list; drop "
                     f"the '[{key}]'")


def _find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = [candidate for candidate in modules if candidate]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    top_level = ", ".join(child for child, _ in model.named_children())
    raise ValueError(f"{describe_architecture(model)} has no module named {name!r}.{hint} Its top-level modules "
                     f"are: {top_level} (inner ones are dotted paths such as 'layer3.0.conv1').")


class TapSet:
    """Forward (pre-)hooks on the named taps; :meth:`captured` returns the latest tensor each captured.

    Usable as a context manager; :meth:`remove` takes the hooks off.  Hooks are registered on the model inside
    DDP / torch.compile wrappers, so names are the bare model's.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str]):
        self.model = unwrap_model(model)
        self.taps = list(dict.fromkeys(taps))
        self._captured: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(self.taps, 0)
        output_fmt = getattr(self.model, "output_fmt", "NCHW")
        self.channels_last = str(getattr(output_fmt, "value", output_fmt)).upper() == "NHWC"
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", None)
        self._handles = []
        try:
            for tap in self.taps:
                name, on_input, key = _parse_tap(tap)
                module = _find_module(self.model, name)
                if on_input:
                    handle = module.register_forward_pre_hook(partial(self._capture_input, tap, key),
                                                              with_kwargs=True)
                else:
                    handle = module.register_forward_hook(partial(self._capture_output, tap, key))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise

    def _store(self, tap: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"tap {tap!r} on {describe_architecture(self.model)} produced a "
                             f"{type(value).__name__}, not a tensor; tap a module that returns a single tensor, or "
                             f"one entry of a dict / tuple output with '[key]' (e.g. 'backbone[0]')")
        self._captured[tap] = value
        self.calls[tap] += 1

    def _capture_input(self, tap: str, key: str | None, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._store(tap, _select_entry(tap, args[0] if args else next(iter(kwargs.values()), None), key))

    def _capture_output(self, tap: str, key: str | None, module: nn.Module, args: tuple, output) -> None:
        self._store(tap, _select_entry(tap, output, key))

    def captured(self, tap: str) -> torch.Tensor:
        """The raw tensor the tap captured in the latest forward."""
        if tap not in self.calls:
            raise KeyError(f"{tap!r} is not one of this object's taps: {', '.join(self.taps)}")
        if tap not in self._captured:
            raise RuntimeError(f"tap {tap!r} has captured nothing yet: run a forward pass of the model first "
                               f"(or the module did not run in it)")
        return self._captured[tap]

    def map(self, tap: str) -> torch.Tensor:
        """The captured tensor as a head takes it (token outputs as B×C×h×w, see :func:`to_feature_map`)."""
        return to_feature_map(self.captured(tap), channels_last=self.channels_last,
                              num_prefix_tokens=self.num_prefix_tokens)

    def clear(self) -> None:
        """Forget captured tensors (they keep activations alive until the next forward otherwise)."""
        self._captured.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> TapSet:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


class FeatureTaps(TapSet):
    """The named features of a model's forward pass, captured by forward hooks (the model is not changed).

    >>> with FeatureTaps(model, ["layer4", "fc"]) as taps:
    ...     logits = model(images)
    ...     feats = taps.features()      # {"layer4": B×C×H×W map, "fc": B×K logits}

    ``names`` are taps (module names, ``"pool4:input"``, ``"backbone[0]"``; see the module's documentation).
    :meth:`features` gives every tap's latest tensor in the layout :class:`diffkd.DiffKDLoss` takes: maps B×C×H×W
    (a channels-last model's B×H×W×C maps permuted), vectors B×K, and B×N×C token sequences as they are, except
    the image tokens of a vision transformer (a model with ``num_prefix_tokens``, as timm's), which lose their
    class / register tokens and become a B×C×h×w grid.
    """

    def __init__(self, model: nn.Module, names: str | Sequence[str]):
        super().__init__(model, [names] if isinstance(names, str) else list(names))

    def _in_loss_layout(self, tap: str) -> torch.Tensor:
        x = self.captured(tap)
        if x.dim() == 4 and self.channels_last:
            return x.permute(0, 3, 1, 2)
        if x.dim() == 3 and self.num_prefix_tokens is not None:
            return tokens_to_map(x, self.num_prefix_tokens)
        return x

    def features(self) -> dict[str, torch.Tensor]:
        """Every tap's latest tensor, by tap name (see the class documentation for layouts)."""
        return {tap: self._in_loss_layout(tap) for tap in self.taps}


class FeatureLogitTaps(FeatureTaps):
    """The two taps of one model of a distillation pair: a feature map and (optionally) the logits.

    >>> with FeatureLogitTaps(model, "layer3", "fc") as taps:
    ...     model(images)
    ...     feature, logits = taps.feature, taps.logits
    """

    def __init__(self, model: nn.Module, feature_module: str, logits_module: str | None = None):
        super().__init__(model, [feature_module] + ([logits_module] if logits_module is not None else []))
        self.feature_module = feature_module
        self.logits_module = logits_module

    @property
    def feature(self) -> torch.Tensor:
        """The feature tap as a B×C×H×W map (or B×K vector), tokens arranged as :meth:`TapSet.map` does."""
        return self.map(self.feature_module)

    @property
    def logits(self) -> torch.Tensor:
        if self.logits_module is None:
            raise RuntimeError("these FeatureLogitTaps were created without a logits module")
        return self.captured(self.logits_module)


# ---- dry forward passes ----------------------------------------------------------------------------------------
def infer_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects: channels from its first convolution; 32×32 for the CIFAR zoo, the patch
    embedding's image size for ViT-like timm models, else timm's pretrained-config input size."""
    target = unwrap_model(model)
    first_conv = next((module for module in target.modules() if isinstance(module, nn.Conv2d)), None)
    patch_embed_size = getattr(getattr(target, "patch_embed", None), "img_size", None)
    pretrained_cfg = getattr(target, "pretrained_cfg", None) or {}
    if isinstance(target, CifarNet):
        spatial = CIFAR_IMAGE_SIZE
    elif patch_embed_size is not None:
        spatial = tuple(patch_embed_size)
    elif "input_size" in pretrained_cfg:
        spatial = tuple(pretrained_cfg["input_size"][1:])
    else:
        spatial = None
    if first_conv is None or spatial is None:
        raise ValueError(f"cannot infer the input size of {describe_architecture(target)}; pass "
                         f"input_size=(channels, height, width)")
    return (first_conv.in_channels, *spatial)


class _EvalNoGrad:
    """Eval mode and no_grad for a dry forward; restores every submodule's own training flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(module, module.training) for module in self.model.modules()]
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc_info) -> None:
        self.no_grad.__exit__(*exc_info)
        for module, training in self.flags:
            module.training = training


def _dry_input(model: nn.Module, input_size: Sequence[int] | None) -> torch.Tensor:
    size = tuple(input_size) if input_size is not None else infer_input_size(model)
    if len(size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {size}")
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return torch.randn(1, *size, device=device, dtype=dtype)


@contextlib.contextmanager
def _explain_failure(model: nn.Module, x: torch.Tensor):
    try:
        yield
    except RuntimeError as error:
        raise ValueError(f"the dry forward of {describe_architecture(model)} on an input of shape {tuple(x.shape)} "
                         f"failed ({error}); pass the input_size=(channels, height, width) the model takes") from error


def probe_taps(model: nn.Module, taps: str | Sequence[str],
               input_size: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes (batch 1) of the tapped tensors, as :class:`FeatureTaps` delivers them, from one dry forward.

    Runs in eval mode under ``torch.no_grad`` and restores the model's training flags.  ``input_size`` is
    (C, H, W), inferred when omitted (:func:`infer_input_size`).  A tap whose module does not run, or runs more
    than once per forward (a shared module: the capture would be ambiguous), raises ValueError.
    """
    taps = [taps] if isinstance(taps, str) else list(taps)
    target = unwrap_model(model)
    x = _dry_input(target, input_size)
    with TapSet(target, taps) as tap_set, _EvalNoGrad(target), _explain_failure(target, x):
        target(x)
    for tap, count in tap_set.calls.items():
        if count != 1:
            problem = "did not run" if count == 0 else f"ran {count} times (a shared module)"
            raise ValueError(f"tap {tap!r} {problem} in one forward of {describe_architecture(target)} on an input "
                             f"of shape {tuple(x.shape)}; choose a module that runs exactly once")
    return {tap: tuple(tap_set.map(tap).shape) for tap in taps}


def _trace_forward(model: nn.Module, x: torch.Tensor):
    """Every module's inputs and outputs, in call order, for ``forward_features`` and ``forward_head``."""
    events: list[tuple[str, str, str, nn.Module, object]] = []  # (stage, kind, name, module, tensor)
    stage = ["features"]

    def on_input(name, module, args, kwargs):
        events.append((stage[0], "input", name, module, args[0] if args else None))

    def on_output(name, module, args, output):
        events.append((stage[0], "output", name, module, output))

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(partial(on_input, name), with_kwargs=True))
            handles.append(module.register_forward_hook(partial(on_output, name)))
    try:
        features = model.forward_features(x)
        stage[0] = "head"
        logits = model.forward_head(features)
    finally:
        for handle in handles:
            handle.remove()
    return events, features, logits


def default_taps(model_name: str, model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[str, str]:
    """(feature tap, logits tap) for a model of the CIFAR zoo or timm, found by tracing one dry forward.

    The feature tap is the last feature map before pooling: the outermost module whose output is what
    ``forward_features`` returns (``layer3`` for the CIFAR ResNets, ``relu`` for WRNs, ``layer4`` for timm
    ResNets, ``norm`` for ViT / Swin, ``bn2`` for timm's MobileNetV1), or, when a functional op made that map,
    the input of the first module of ``forward_head`` (``pool4:input`` for VGG, ``avgpool:input`` for
    ShuffleV2).  The logits tap is the outermost module whose output is the logits (``fc``, ``classifier``,
    ``linear``, ``head``).
    """
    target = unwrap_model(model)
    if not (callable(getattr(target, "forward_features", None)) and callable(getattr(target, "forward_head", None))):
        raise ValueError(f"cannot find default taps for {model_name!r} ({describe_architecture(target)}): it does not "
                         f"split its forward into forward_features / forward_head like timm's models. Name the "
                         f"modules yourself, e.g. FeatureTaps(model, 'layer4', 'fc').")
    x = _dry_input(target, input_size)
    with _EvalNoGrad(target), _explain_failure(target, x):
        events, features, logits = _trace_forward(target, x)

    def last_output(stage: str, tensor: torch.Tensor) -> str | None:
        names = [name for event_stage, kind, name, module, value in events
                 if event_stage == stage and kind == "output" and value is tensor
                 and not isinstance(module, nn.Identity)]
        return names[-1] if names else None  # modules finish inside-out: the last one is the outermost

    feature_tap = last_output("features", features)
    if feature_tap is None:
        feature_tap = next((name + INPUT_SUFFIX for event_stage, kind, name, module, value in events
                            if event_stage == "head" and kind == "input" and value is features
                            and not isinstance(module, nn.Identity)), None)
    logits_tap = last_output("head", logits)
    if feature_tap is None or logits_tap is None:
        missing = "feature map" if feature_tap is None else "logits"
        raise ValueError(f"no module of {model_name!r} ({describe_architecture(target)}) outputs or receives its "
                         f"{missing} directly; name the taps yourself: FeatureTaps(model, feature_module, "
                         f"logits_module)")
    return feature_tap, logits_tap
