"""DiffKDLoss: DiffKD heads over named (student, teacher) feature pairs, for any training loop.

The library's core object: the trainer's Distillers, timm's task and torchdistill's registration all distil
through it, and a training loop of one's own can too::

    loss_fn = DiffKDLoss({"layer4": (512, 2048), "logits": (1000, 1000)}, vectors=("logits",))
    optimizer = torch.optim.SGD([*student.parameters(), *loss_fn.parameters()], lr=0.1)
    out = loss_fn({"layer4": s_map, "logits": s_logits}, {"layer4": t_map, "logits": t_logits})
    (task_loss + out["loss"]).backward()   # out["layer4/kd_loss"], out["logits/gamma"], ...: detached, to log

Each pair gets a :class:`diffkd.DiffKDHead` (the paper's method: trans → adaptive noise matching → DDIM chain of
the denoiser → proj → distance to the teacher, plus the diffusion loss).  What a pair's tensors may be:

- **maps** B×C×H×W: the spatial head (3×3 convolutions in the denoiser and the noise adapter, as the paper's
  feature head).  Where the student's and the teacher's sizes differ, the larger map is average-pooled
  (adaptively) to the smaller size, and a warning says so once per pair; nothing is upsampled.
- **token sequences** B×N×C of any length N (a language model's hidden states): the same head on the sequence as
  a B×C×N×1 map, where each 3×3 convolution sees zero padding beside the single column and so acts as a 1-D
  convolution of width 3 along the sequence.  Sequences of different lengths are pooled like maps.  Image
  tokens meant as a 2-D grid are turned into maps before they come here (:class:`diffkd.FeatureTaps` does that
  for vision transformers).
- **vectors** B×K, for the pairs named in ``vectors``: the paper's logit head (kernel size 1, KL divergence with
  τ = 1 unless ``head_options`` say otherwise).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models.checkpoint import unwrap_model
from diffkd.models.taps import FeatureTaps, _EvalNoGrad, describe_spatial_match, match_spatial
from diffkd.modules import DiffKDHead

# The paper's logit head: 1×1 convolutions only, KL divergence at τ = 1.
VECTOR_HEAD_DEFAULTS = {"kernel_size": 1, "distance": "kl", "temperature": 1.0}
# Per-head outputs that are tensors to inspect, not numbers to log.
UNLOGGED_TERMS = ("loss", "denoised", "target")
_LAYOUT_DIMS = {"vector": (2,), "map": (3, 4)}  # "map": B×C×H×W maps and B×N×C sequences
_LAYOUT_NAMES = {"vector": "B×K vectors", "map": "B×C×H×W maps or B×N×C sequences"}


def check_pair_name(name: str) -> None:
    if not isinstance(name, str) or "/" in name or any(not part for part in name.split(".")):
        raise ValueError(f"a pair (head) name is a non-empty string of dot-separated parts without '/' (it prefixes "
                         f"the logged terms, '<name>/<term>'), got {name!r}")


def module_tree(modules: Mapping[str, nn.Module]) -> nn.ModuleDict:
    """An nn.ModuleDict in which a dotted name nests: {"fpn.0": m} → ModuleDict(fpn=ModuleDict(0=m))."""
    root = nn.ModuleDict()
    for name, module in modules.items():
        check_pair_name(name)
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if part not in node:
                node[part] = nn.ModuleDict()
            node = node[part]
            if not isinstance(node, nn.ModuleDict):
                raise ValueError(f"head name {name!r} nests under another head's name; rename one of them")
        if leaf in node:
            raise ValueError(f"head name {name!r} is also the prefix of other heads' names; rename one of them")
        node[leaf] = module
    return root


def _check_known(what: str, names, pairs: Mapping) -> None:
    unknown = [name for name in names if name not in pairs]
    if unknown:
        raise ValueError(f"{what} names {unknown}, which are not among the pairs ({', '.join(pairs)})")


def _channel_pair(name: str, pair) -> tuple[int, int]:
    if (not isinstance(pair, Sequence) or len(pair) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in pair)):
        raise ValueError(f"pair {name!r}: expected (student_channels, teacher_channels), two positive integers, "
                         f"got {pair!r}")
    return pair[0], pair[1]


def _resolve_graph(graph) -> bool:
    if not (graph is True or graph is False or graph == "auto"):
        raise ValueError(f"graph must be 'auto', True or False, got {graph!r}")
    return torch.cuda.is_available() if graph == "auto" else graph


def _pool_sequence(x: torch.Tensor, length: int) -> torch.Tensor:
    """B×N×C → B×length×C, average-pooled along the sequence (adaptive windows)."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), length).transpose(1, 2)


def _describe_sequence_match(student_length: int, teacher_length: int) -> str:
    longer = "student" if student_length > teacher_length else "teacher"
    return (f"the {longer}'s {max(student_length, teacher_length)}-token sequence is average-pooled to "
            f"{min(student_length, teacher_length)} tokens before the DiffKD head")


class DiffKDLoss(nn.Module):
    """DiffKD heads over named (student, teacher) feature pairs; the loss of all of them, weighted and summed.

    ``channels`` maps each pair's name to (student channels, teacher channels) — C of a map or sequence, K of a
    vector.  ``vectors`` names the pairs that are B×K vectors (logit heads).  ``weights`` multiply pairs' losses
    (default 1).  ``graph``: wrap every head in :class:`diffkd.CUDAGraphHead` — "auto" where CUDA is available
    (on CPU tensors it runs eagerly anyway), True, or False.  ``head_options`` give one pair's
    :class:`diffkd.DiffKDHead` arguments (``{"layer4": dict(use_ae=True, ae_channels=1024)}``), ``head_kwargs``
    those of every pair (``inference_steps=5``, ``use_anm=True``, ``kd_weight``, ...); a pair's own options win.
    The kernel size follows the layout (3 for maps and sequences, 1 for vectors); set it per pair if need be.

    ``forward(student_feats, teacher_feats)`` takes mappings from pair names to tensors (the layouts of the
    module's documentation) and returns ``loss`` (differentiable: Σ weight × head loss, added to ``task_loss``
    when given) and, detached as float 0-dim tensors, ``<name>/<term>`` for every term of every head:
    ``kd_loss``, ``diffusion_loss``, ``ae_loss``, ``gamma`` (the batch mean of ANM's γ), ``gamma_std``,
    ``rel_error_before``, ``rel_error_after``.  ``parameters()`` are the heads' parameters, all trainable: give
    them to the optimizer; the deployed student does not carry them (:meth:`extra_parameter_count`).
    """

    def __init__(self, channels: Mapping[str, tuple[int, int]], *, vectors: Sequence[str] = (),
                 weights: Mapping[str, float] | None = None, graph: str | bool = "auto",
                 head_options: Mapping[str, Mapping] | None = None, **head_kwargs):
        super().__init__()
        channels = dict(channels)
        if not channels:
            raise ValueError("DiffKDLoss needs at least one pair: {name: (student_channels, teacher_channels)}")
        vectors = (vectors,) if isinstance(vectors, str) else tuple(vectors)
        head_options = dict(head_options or {})
        _check_known("vectors", vectors, channels)
        _check_known("head_options", head_options, channels)
        if "kernel_size" in head_kwargs:
            raise ValueError("kernel_size follows each pair's layout (3 for maps and sequences, 1 for the pairs in "
                             "vectors=); to change one pair's, pass head_options={name: dict(kernel_size=...)}")
        heads = {}
        for name, pair in channels.items():
            check_pair_name(name)
            student_channels, teacher_channels = _channel_pair(name, pair)
            options = {**(VECTOR_HEAD_DEFAULTS if name in vectors else {}), **head_kwargs, **head_options.get(name, {})}
            try:
                heads[name] = DiffKDHead(student_channels, teacher_channels, **options)
            except (TypeError, ValueError) as error:
                raise ValueError(f"pair {name!r}: {error}") from error
        layouts = {name: "vector" if name in vectors else "map" for name in channels}
        self._attach(heads, dict.fromkeys(heads), weights, layouts, graph=graph, note_pooling=True)

    @classmethod
    def from_heads(cls, heads: Mapping[str, nn.Module], *, head_of: Mapping[str, str | None] | None = None,
                   weights: Mapping[str, float] | None = None, graph: str | bool = False,
                   note_pooling: bool = True) -> DiffKDLoss:
        """A DiffKDLoss over heads built elsewhere: any module ``head(student, teacher) -> dict`` with ``loss``.

        ``head_of`` maps pair names to head names, so that several pairs can share one head (None, or a pair
        left out: the head of the pair's own name); by default each head is one pair of its name.  Only DiffKD
        heads used by a single pair are graphed (a graph replays one call per backward).  ``note_pooling=False``
        leaves the pooling notes to the caller (who said them at start-up).
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        heads = dict(heads)
        head_of = dict(head_of) if head_of is not None else dict.fromkeys(heads)
        for pair, head in head_of.items():
            check_pair_name(pair)
            if (head or pair) not in heads:
                raise ValueError(f"pair {pair!r} uses head {head or pair!r}, which is not one of the heads "
                                 f"({', '.join(heads) or 'none'})")
        self._attach(heads, head_of, weights, dict.fromkeys(head_of), graph=graph, note_pooling=note_pooling)
        return self

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, taps: Mapping[str, tuple[str | None, str | None]],
                    sample_input, **options) -> DiffKDLoss:
        """A DiffKDLoss whose channels and layouts come from one dry forward pass of each model.

        ``taps`` maps pair names to (student tap, teacher tap): module names as :class:`diffkd.FeatureTaps`
        takes them, or None for the model's output (logits).  ``sample_input``: a tensor, a tuple of positional
        arguments or a dict of keyword arguments the models take (one sample is enough).  Pairs whose tensors are
        B×K become vector pairs.  ``options`` are the constructor's (``weights``, ``graph``, ``head_options``,
        head arguments).  The result keeps ``taps``, and :meth:`pair_inputs` turns captured features into the
        mapping ``forward`` takes.
        """
        if "vectors" in options:
            raise ValueError("from_models finds the vector pairs itself (tensors of shape B×K); drop vectors=")
        taps = {name: tuple(pair) for name, pair in taps.items()}
        for name, pair in taps.items():
            if len(pair) != 2 or not all(tap is None or isinstance(tap, str) for tap in pair):
                raise ValueError(f"pair {name!r}: expected (student tap, teacher tap), module names or None for the "
                                 f"model's output, got {pair!r}")
        shapes = {role: measure_features(model, [pair[index] for pair in taps.values()], sample_input)
                  for index, (role, model) in enumerate((("student", student), ("teacher", teacher)))}
        channels, vectors = {}, []
        for name, (student_tap, teacher_tap) in taps.items():
            student_shape, teacher_shape = shapes["student"][student_tap], shapes["teacher"][teacher_tap]
            if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
                raise ValueError(f"pair {name!r}: the student's {student_tap or 'output'} has shape "
                                 f"{student_shape} and the teacher's {teacher_tap or 'output'} {teacher_shape}; "
                                 f"a pair is two maps (B×C×H×W), two sequences (B×N×C) or two vectors (B×K)")
            channel_dim = 2 if len(student_shape) == 3 else 1
            channels[name] = (student_shape[channel_dim], teacher_shape[channel_dim])
            if len(student_shape) == 2:
                vectors.append(name)
        loss = cls(channels, vectors=vectors, **options)
        loss.taps = taps
        return loss

    def _attach(self, heads: Mapping[str, nn.Module], head_of: Mapping[str, str | None],
                weights: Mapping[str, float] | None, layouts: Mapping[str, str | None], *, graph,
                note_pooling: bool) -> None:
        weights = dict(weights or {})
        _check_known("weights", weights, head_of)
        for name, weight in weights.items():
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"weights[{name!r}] must be a number >= 0, got {weight!r}")
        self.heads = module_tree(heads)
        self.head_of = {pair: head or pair for pair, head in head_of.items()}
        self.weights = {pair: weights.get(pair, 1.0) for pair in self.head_of}
        self.layouts = dict(layouts)
        self.taps: dict[str, tuple[str | None, str | None]] | None = None
        self.note_pooling = note_pooling
        self._pooling_noted: set[str] = set()
        if _resolve_graph(graph):
            from diffkd.graphs import CUDAGraphHead  # here: its module imports torch._dynamo, seconds of start-up

            uses = list(self.head_of.values())
            for name in dict.fromkeys(uses):
                head = self.heads.get_submodule(name)
                if isinstance(head, DiffKDHead) and uses.count(name) == 1:
                    self.heads.set_submodule(name, CUDAGraphHead(head))

    def extra_repr(self) -> str:
        return f"pairs={list(self.head_of)}, weights={self.weights}"

    # ---- what the heads are ------------------------------------------------------------------------------------
    def head_modules(self) -> dict[str, nn.Module]:
        """Every head module by its name (dotted where names nest), each once even when pairs share it."""
        return {name: self.heads.get_submodule(name) for name in dict.fromkeys(self.head_of.values())}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters that require gradients: what the optimizer must see besides the student's."""
        return [p for p in self.parameters() if p.requires_grad]

    def extra_parameter_count(self) -> int:
        """Parameters that exist only for training (the heads); the deployed student does not carry them."""
        return sum(p.numel() for p in self.parameters())

    def pair_inputs(self, role: str, features: Mapping[str, torch.Tensor],
                    output: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``forward``'s mapping for one model (``role`` "student" or "teacher") of a :meth:`from_models` loss:
        each pair's tensor from ``features`` (:meth:`diffkd.FeatureTaps.features`) or, for a None tap, ``output``."""
        if self.taps is None:
            raise ValueError("pair_inputs needs the taps of DiffKDLoss.from_models; this loss was built from channels")
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        index = 0 if role == "student" else 1
        inputs = {}
        for name, pair in self.taps.items():
            tap = pair[index]
            if tap is None and output is None:
                raise ValueError(f"pair {name!r} distils the {role}'s output; pass output=")
            if tap is not None and tap not in features:
                raise ValueError(f"pair {name!r} needs the {role}'s tap {tap!r}, which is not among the features "
                                 f"({', '.join(features) or 'none'})")
            inputs[name] = output if tap is None else features[tap]
        return inputs

    # ---- the loss ----------------------------------------------------------------------------------------------
    def _check_names(self, what: str, feats) -> None:
        if not isinstance(feats, Mapping):
            raise ValueError(f"{what} must be a mapping from pair names to tensors, got {type(feats).__name__}")
        missing = [name for name in self.head_of if name not in feats]
        extra = [name for name in feats if name not in self.head_of]
        if missing or extra:
            problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {extra}"] if extra else [])
            raise ValueError(f"{what} must hold exactly the pairs {list(self.head_of)}: {'; '.join(problems)}")

    def _matched(self, name: str, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair's tensors checked against its layout, the larger map or longer sequence pooled to the other."""
        for role, x in (("student", student), ("teacher", teacher)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"pair {name!r}: the {role} feature is a {type(x).__name__}, not a tensor")
        layout = self.layouts.get(name)
        if layout is not None and not (student.dim() in _LAYOUT_DIMS[layout] and teacher.dim() in _LAYOUT_DIMS[layout]):
            hint = ("drop it from vectors=" if layout == "vector" else "list it in vectors=")
            raise ValueError(f"pair {name!r} was built for {_LAYOUT_NAMES[layout]}, got student shape "
                             f"{tuple(student.shape)} and teacher shape {tuple(teacher.shape)}; {hint} if that is "
                             f"what it is")
        if student.dim() == teacher.dim() == 4:
            matched = match_spatial(student, teacher)
            note = lambda: describe_spatial_match(student.shape, teacher.shape)  # noqa: E731
        elif student.dim() == teacher.dim() == 3 and student.shape[1] != teacher.shape[1]:
            length = min(student.shape[1], teacher.shape[1])
            matched = tuple(x if x.shape[1] == length else _pool_sequence(x, length) for x in (student, teacher))
            note = lambda: _describe_sequence_match(student.shape[1], teacher.shape[1])  # noqa: E731
        else:
            return student, teacher
        pooled = matched[0] is not student or matched[1] is not teacher
        if pooled and self.note_pooling and name not in self._pooling_noted:
            self._pooling_noted.add(name)
            warnings.warn(f"DiffKDLoss pair {name!r}: {note()}", UserWarning, stacklevel=2)
        return matched

    def forward(self, student_feats: Mapping[str, torch.Tensor], teacher_feats: Mapping[str, torch.Tensor], *,
                task_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check_names("student_feats", student_feats)
        self._check_names("teacher_feats", teacher_feats)
        out: dict[str, torch.Tensor] = {}
        loss = task_loss
        for name, head_name in self.head_of.items():
            student, teacher = self._matched(name, student_feats[name], teacher_feats[name])
            terms = self.heads.get_submodule(head_name)(student, teacher)
            weight = self.weights[name]
            contribution = terms["loss"] if weight == 1 else weight * terms["loss"]
            loss = contribution if loss is None else loss + contribution
            for term, value in terms.items():
                if term not in UNLOGGED_TERMS:
                    out[f"{name}/{term}"] = value.detach().float().mean()
        out["loss"] = loss
        return out


def measure_features(model: nn.Module, taps: Sequence[str | None],
                     sample_input) -> dict[str | None, tuple[int, ...]]:
    """Shapes of the tapped tensors (as :meth:`diffkd.FeatureTaps.features` gives them) and, under the key None,
    of the model's output, from one forward pass in eval mode without gradients (training flags restored)."""
    target = unwrap_model(model)
    names = [tap for tap in dict.fromkeys(taps) if tap is not None]
    if isinstance(sample_input, Mapping):
        call: Callable[[], object] = lambda: target(**sample_input)  # noqa: E731
    elif isinstance(sample_input, tuple):
        call = lambda: target(*sample_input)  # noqa: E731
    else:
        call = lambda: target(sample_input)  # noqa: E731
    with FeatureTaps(target, names) as tapped, _EvalNoGrad(target):
        output = call()
    for tap, count in tapped.calls.items():
        if count != 1:
            problem = "did not run" if count == 0 else f"ran {count} times (a shared module)"
            raise ValueError(f"tap {tap!r} {problem} in one forward of {type(target).__name__}; choose a module that "
                             f"runs exactly once")
    shapes: dict[str | None, tuple[int, ...]] = {tap: tuple(x.shape) for tap, x in tapped.features().items()}
    if None in taps:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"{type(target).__name__} returns a {type(output).__name__}, not a tensor: name the "
                             f"module whose output to distil instead of None")
        shapes[None] = tuple(output.shape)
    return shapes
