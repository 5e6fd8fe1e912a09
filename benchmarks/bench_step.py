"""One whole training step (teacher forward, student forward+backward, heads, SGD step) on synthetic data, in
images/s, for the student alone, KD, and DiffKD with each way of running its two heads; DiffKD's cost over KD in
time and, beside it, in FLOPs (torch.utils.flop_counter; at ResNet-34 → ResNet-18 a DiffKD step does ≈ 1.40× the
FLOPs of a KD step, README).

Methods (rows), every DiffKD variant with the same head weights:
  none            the student alone (cross-entropy)
  kd              KD: CE·w + KL·(1−w)
  diffkd-paper    DiffKD heads as the paper's code runs them (benchmarks/naive_head.py: diffusers' DDIMScheduler)
  diffkd-torch    our heads, eager PyTorch ops (backend "torch")
  diffkd-triton   our heads, eager Triton kernels (backend "triton"; CUDA, or the interpreter for dry runs)
  diffkd-graphed  our heads in diffkd.CUDAGraphHead: forward+backward replayed from CUDA graphs (on a CPU it runs
                  the heads eagerly: the "head path" column says so)
  diffkd-compile  our heads under torch.compile(mode="reduce-overhead") (GPU by default: minutes on a CPU)
Pairs: ResNet-34 → ResNet-18 at ImageNet shapes (224², batch 64 on a GPU, 4 on a CPU; feature head on layer4, 512
ch, 7×7, with the 1024-channel autoencoder; logit head K 1000; timm models with random weights, nothing is
downloaded) and ResNet32x4 → ResNet8x4 at CIFAR shapes (batch 64; feature head on layer3, 256 ch, 8×8; logit
head K 100).  Losses: KD = CE·w + KL·(1−w) at the benchmark's τ; DiffKD = CE + both heads (weight 1).

On a GPU the section also checks CUDAGraphHead against an eager twin running the same kernels, over three steps
from the same random state each (every output, the student feature's gradient, every parameter gradient and the
BatchNorm statistics), and reports the ratios the graphed step is meant to reach.

    python benchmarks/bench_step.py --threads 1 --clock cpu              # CPU: both pairs, the CPU methods
    python benchmarks/bench_step.py --pairs imagenet --methods kd,diffkd-torch,diffkd-graphed   # on a GPU
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks import _cli  # noqa: E402
from benchmarks._report import Results, make_table, print_section  # noqa: E402
from benchmarks._timing import TimingPlan, is_gpu, time_candidates, time_left  # noqa: E402
from benchmarks.naive_head import NaiveDiffKDHead, PaperScheduler  # noqa: E402
from diffkd import CUDAGraphHead, DiffKDHead, kl_div_loss  # noqa: E402
from diffkd.graphs import SELF_CHECK_TOLERANCE, StepRecord, compare_steps, head_path  # noqa: E402
from diffkd.models import FeatureLogitTaps, create_model, default_taps, match_spatial, probe_taps  # noqa: E402
import kernels  # noqa: E402
from kernels._common import interpreter_enabled  # noqa: E402

METHODS = ("none", "kd", "diffkd-paper", "diffkd-torch", "diffkd-triton", "diffkd-graphed", "diffkd-compile")
DIFFKD_METHODS = tuple(m for m in METHODS if m.startswith("diffkd"))
HEAD_KINDS = ("feature", "logit")
COMPILE_RESERVE_S = 60  # compiling both heads' forward+backward in reduce-overhead mode can take this long
EQUALITY_STEPS = 3
# (name, numerator method, denominator method, target, "max" or "min", what it says)
TARGETS = (
    ("graphed DiffKD step / KD step", "diffkd-graphed", "kd", 1.5, "max",
     "DiffKD's overhead in time; the FLOP floor is ≈ 1.40 at ResNet-34 → ResNet-18"),
    ("paper's code / graphed (speed-up)", "diffkd-paper", "diffkd-graphed", 1.3, "min",
     "a DiffKD step with our graphed heads against the paper's code"),
    ("reduce-overhead compile / graphed (speed-up)", "diffkd-compile", "diffkd-graphed", 1.2, "min",
     "against torch.compile(mode='reduce-overhead') of the same heads"),
)


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    num_classes: int
    image_size: int
    gpu_batch: int
    cpu_batch: int
    kd_ce_weight: float  # KD loss = w·CE + (1 − w)·KL at kd_temperature
    kd_temperature: float
    lr: float
    weight_decay: float
    ae_channels: int | None
    description: str


PAIRS = {
    "imagenet": Pair("resnet34", "resnet18", 1000, 224, 64, 4, 0.5, 1.0, 0.1, 1e-4, 1024,
                     "ResNet-34 → ResNet-18, ImageNet shapes (224×224), feature head with AE 1024"),
    "cifar": Pair("resnet32x4", "resnet8x4", 100, 32, 64, 64, 0.1, 4.0, 0.05, 5e-4, None,
                  "ResNet32x4 → ResNet8x4, CIFAR shapes (32×32)"),
    "tiny": Pair("resnet14", "resnet8", 10, 8, 4, 4, 0.1, 4.0, 0.05, 5e-4, None,
                 "tiny CIFAR pair ResNet14 → ResNet8 at 8×8 (dry runs and tests)"),
}


def method_availability(device) -> dict[str, str | None]:
    """None for a method that runs here by default, else why it does not."""
    gpu = is_gpu(device)
    return {**dict.fromkeys(METHODS),
            "diffkd-triton": None if gpu or interpreter_enabled() else
            "the Triton kernels need a CUDA GPU (TRITON_INTERPRET=1 runs them in the interpreter, for dry runs only)",
            "diffkd-compile": None if gpu else
            "torch.compile of the heads takes minutes on a CPU (ask for it with --methods to run it anyway)"}


def default_methods(device) -> tuple[str, ...]:
    available = method_availability(device)
    return tuple(m for m in METHODS if available[m] is None)


class TrainingSetup:
    """Teacher (eval, frozen), student, synthetic batch and reference heads of a pair; per method its heads and
    optimizer, built on first use from the same reference weights."""

    def __init__(self, pair: Pair, batch: int, device):
        torch.manual_seed(0)
        self.pair, self.batch, self.device = pair, batch, device
        self.teacher = create_model(pair.teacher, num_classes=pair.num_classes).to(device).eval()
        self.teacher.requires_grad_(False)
        self.student = create_model(pair.student, num_classes=pair.num_classes).to(device).train()
        input_size = (3, pair.image_size, pair.image_size)
        self.taps = {}
        shapes = {}
        for role, model, name in (("teacher", self.teacher, pair.teacher), ("student", self.student, pair.student)):
            feature, logits = default_taps(name, model, input_size)
            shapes[role] = probe_taps(model, [feature, logits], input_size)[feature]
            self.taps[role] = FeatureLogitTaps(model, feature, logits)
        self.tap_names = {role: taps.feature_module for role, taps in self.taps.items()}
        self.feature_shapes = shapes
        self.head_kwargs = {
            "feature": dict(student_channels=shapes["student"][1], teacher_channels=shapes["teacher"][1],
                            use_ae=pair.ae_channels is not None, ae_channels=pair.ae_channels),
            "logit": dict(student_channels=pair.num_classes, teacher_channels=pair.num_classes, kernel_size=1,
                          distance="kl")}
        self.reference = {kind: DiffKDHead(**kwargs, backend="torch").to(device)
                          for kind, kwargs in self.head_kwargs.items()}
        self.images = torch.randn(batch, *input_size, device=device)
        self.labels = torch.randint(0, pair.num_classes, (batch,), device=device)
        self.heads: dict[str, dict[str, torch.nn.Module]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._scheduler = None

    def head_copy(self, kind: str, backend: str) -> DiffKDHead:
        """A head of ``kind`` with the reference weights and ``backend``."""
        head = DiffKDHead(**self.head_kwargs[kind], backend=backend).to(self.device)
        head.load_state_dict(self.reference[kind].state_dict())
        return head

    def _build_heads(self, method: str) -> dict[str, torch.nn.Module]:
        if method == "diffkd-paper":
            self._scheduler = self._scheduler or PaperScheduler()
            return {kind: NaiveDiffKDHead.from_head(head, self._scheduler) for kind, head in self.reference.items()}
        if method == "diffkd-graphed":
            return {kind: CUDAGraphHead(self.head_copy(kind, "auto")) for kind in HEAD_KINDS}
        if method == "diffkd-compile":
            return {kind: torch.compile(self.head_copy(kind, "auto"), mode="reduce-overhead", dynamic=False)
                    for kind in HEAD_KINDS}
        return {kind: self.head_copy(kind, method.removeprefix("diffkd-")) for kind in HEAD_KINDS}

    def prepare(self, method: str) -> None:
        """Builds ``method``'s heads and optimizer (student parameters + its heads')."""
        if method in self.optimizers:
            return
        heads = self._build_heads(method) if method in DIFFKD_METHODS else {}
        self.heads[method] = heads
        params = list(self.student.parameters()) + [p for head in heads.values() for p in head.parameters()]
        self.optimizers[method] = torch.optim.SGD(params, lr=self.pair.lr, momentum=0.9,
                                                  weight_decay=self.pair.weight_decay)

    def path(self, method: str) -> str:
        """How ``method`` runs its heads (for the table)."""
        if method not in DIFFKD_METHODS:
            return ""
        if method == "diffkd-paper":
            return "paper's code"
        if method == "diffkd-compile":
            return "torch.compile reduce-overhead"
        return " / ".join(dict.fromkeys(head_path(head, self.device) for head in self.heads[method].values()))

    def step(self, method: str) -> torch.Tensor:
        """One training step of ``method``; returns the loss."""
        self.prepare(method)
        pair, optimizer, heads = self.pair, self.optimizers[method], self.heads[method]
        if method == "diffkd-compile":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration for the compiled heads' CUDA graphs
        optimizer.zero_grad(set_to_none=True)
        if method != "none":
            with torch.no_grad():
                self.teacher(self.images)
            teacher_feature, teacher_logits = self.taps["teacher"].feature, self.taps["teacher"].logits
        logits = self.student(self.images)
        ce = F.cross_entropy(logits, self.labels)
        if method == "none":
            loss = ce
        elif method == "kd":
            loss = pair.kd_ce_weight * ce + (1 - pair.kd_ce_weight) * kl_div_loss(logits, teacher_logits,
                                                                                 pair.kd_temperature)
        else:
            student_feature, teacher_feature = match_spatial(self.taps["student"].feature, teacher_feature)
            loss = (ce + heads["feature"](student_feature, teacher_feature)["loss"]
                    + heads["logit"](logits, teacher_logits)["loss"])
        loss.backward()
        optimizer.step()
        return loss.detach()

    def flops(self, method: str) -> int:
        """Matmul/convolution FLOPs of one training step (forward and backward) as FlopCounterMode counts them."""
        counter = FlopCounterMode(display=False)
        with counter:
            self.step(method)
        return counter.get_total_flops()

    def feature_inputs(self, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (student, teacher) inputs of a head of ``kind`` at this pair's shapes."""
        if kind == "logit":
            shapes = [(self.batch, self.pair.num_classes)] * 2
        else:
            side = min(self.feature_shapes["student"][2], self.feature_shapes["teacher"][2])
            shapes = [(self.batch, self.feature_shapes[role][1], side, side) for role in ("student", "teacher")]
        student, teacher = (torch.randn(shape, generator=generator).to(self.device) for shape in shapes)
        return student.requires_grad_(), teacher


# ---- CUDAGraphHead against its eager twin ---------------------------------------------------------------------
def _rng_state(device):
    return torch.cuda.get_rng_state(device) if is_gpu(device) else torch.get_rng_state()


def _set_rng_state(state, device):
    if is_gpu(device):
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _record(outputs: dict, student: torch.Tensor, head: torch.nn.Module) -> StepRecord:
    return StepRecord({k: v.detach().clone() for k, v in outputs.items()}, student.grad.detach().clone(),
                      {n: None if p.grad is None else p.grad.detach().clone() for n, p in head.named_parameters()},
                      {n: b.detach().clone() for n, b in head.named_buffers()})


def check_graphed_against_eager(setup: TrainingSetup, steps: int = EQUALITY_STEPS) -> dict:
    """CUDAGraphHead(head) against an eager twin with the same weights and kernels (``kernels.auto_uses_triton()``),
    for both heads over ``steps`` SGD steps, each step from the same random state: every output, the student
    feature's gradient, every parameter gradient and every buffer (BatchNorm statistics, num_batches_tracked)."""
    device = setup.device
    generator = torch.Generator().manual_seed(1)
    report = {"tolerance": SELF_CHECK_TOLERANCE, "steps": steps, "heads": {}}
    for kind in HEAD_KINDS:
        graphed, twin = CUDAGraphHead(setup.head_copy(kind, "auto")), setup.head_copy(kind, "auto")
        optimizers = [torch.optim.SGD(m.parameters(), lr=setup.pair.lr, momentum=0.9) for m in (graphed, twin)]
        per_step = []
        for _ in range(steps):
            student, teacher = setup.feature_inputs(kind, generator)
            twin_student = student.detach().clone().requires_grad_()
            state = _rng_state(device)
            outputs = graphed(student, teacher)
            outputs["loss"].backward()
            ours = _record(outputs, student, graphed.head)
            _set_rng_state(state, device)
            with kernels.auto_uses_triton():  # the kernels the graph runs, with the same in-kernel noise
                outputs = twin(twin_student, teacher)
            outputs["loss"].backward()
            verdict = compare_steps(ours, _record(outputs, twin_student, twin))
            per_step.append({k: verdict[k] for k in ("passed", "worst", "worst_of", "reason")})
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        report["heads"][kind] = {
            "passed": all(s["passed"] for s in per_step), "worst": max(s["worst"] for s in per_step),
            "path": graphed.path, "fallback_reason": graphed.fallback_reason, "self_checks": graphed.self_checks,
            "num_batches_tracked": int(graphed.head.proj[1].num_batches_tracked), "steps": per_step}
    report["passed"] = all(h["passed"] for h in report["heads"].values())
    return report


def equality_table(pair: Pair, report: dict) -> dict:
    rows = []
    for kind, head in report["heads"].items():
        worst = max(head["steps"], key=lambda s: s["worst"])
        self_check = ("passed" if head["self_checks"] and all(v["passed"] for v in head["self_checks"].values())
                      else "none ran" if not head["self_checks"] else "FAILED")
        rows.append([kind, head["path"], "PASSED" if head["passed"] else "FAILED", head["worst"],
                     worst["worst_of"] or "-",
                     self_check, head["num_batches_tracked"], head["fallback_reason"] or ""])
    return make_table(
        f"{pair.description}: CUDAGraphHead vs eager twin, {report['steps']} SGD steps, same random state per step",
        ["head", "path", "equal", "worst rel err", "worst in", "self-check", "BN steps", "fallback"], rows,
        [f"passes when every output, gradient and buffer is within {report['tolerance']:g} relative error "
         "(num_batches_tracked exactly) of the eager twin running the same kernels"])


def target_rows(timings_ms: dict[str, float]) -> list[dict]:
    """The ratios the graphed step is meant to reach, where both of their methods were timed."""
    rows = []
    for name, numerator, denominator, target, kind, meaning in TARGETS:
        if numerator in timings_ms and denominator in timings_ms:
            value = timings_ms[numerator] / timings_ms[denominator]
            met = value <= target if kind == "max" else value >= target
            rows.append({"ratio": name, "value": value, "target": f"{'≤' if kind == 'max' else '≥'} {target:g}",
                         "met": met, "meaning": meaning})
    return rows


# ---- the section ----------------------------------------------------------------------------------------------
def _time_methods(section: dict, setup: TrainingSetup, name: str, methods, device, plan, deadline) -> dict:
    """Warms up (compiles, captures) and times ``methods``; a failing method is recorded and left out."""
    runs = {}
    for method in methods:
        try:
            setup.step(method)  # warm-up outside the timer: cuDNN, Triton compile, graph capture, torch.compile
            runs[method] = (lambda m=method: setup.step(m))
        except Exception as exc:  # one method failing leaves the others
            Results.error(section, f"{name} / {method}", exc)
    if not runs or time_left(deadline) <= 0:
        return {}
    return time_candidates(runs, device, plan, deadline)


def _pair_tables(section: dict, name: str, setup: TrainingSetup, timings: dict, flops: dict) -> None:
    pair, batch = setup.pair, setup.batch
    rows = []
    diffkd_flops = next((flops[m] for m in ("diffkd-torch", "diffkd-paper") if m in flops), None)
    for method, timing in timings.items():
        method_flops = flops.get(method, diffkd_flops if method in DIFFKD_METHODS else None)
        time_ratio = timing.median_ms / timings["kd"].median_ms if "kd" in timings else None
        flop_ratio = method_flops / flops["kd"] if method_flops and flops.get("kd") else None
        per_image = method_flops / batch / 1e9 if method_flops else None
        rows.append([method, setup.path(method), timing.median_ms, batch / timing.median_ms * 1e3, time_ratio,
                     per_image, flop_ratio])
        section["records"].append({"pair": name, "method": method, "head_path": setup.path(method), "batch": batch,
                                   **timing.as_dict(), "images_per_s": batch / timing.median_ms * 1e3,
                                   "time_vs_kd": time_ratio, "gflop_per_image": per_image,
                                   "flops_vs_kd": flop_ratio})
    notes = [f"feature head on {setup.tap_names['student']} {setup.feature_shapes['student'][1:]} / "
             f"{setup.tap_names['teacher']} {setup.feature_shapes['teacher'][1:]}, logit head K {pair.num_classes}"]
    if "diffkd-graphed" in timings:
        graphed = {kind: {"path": head.path, "fallback_reason": head.fallback_reason,
                          "self_checks_passed": [v["passed"] for v in head.self_checks.values()]}
                   for kind, head in setup.heads["diffkd-graphed"].items()}
        section.setdefault("graphed_heads", {})[name] = graphed
        notes.append("diffkd-graphed: " + "; ".join(
            f"{kind} head {g['path']}, self-check "
            + ("passed" if g["self_checks_passed"] and all(g["self_checks_passed"]) else
               "FAILED" if g["self_checks_passed"] else "not run")
            + (f", fell back: {g['fallback_reason']}" if g["fallback_reason"] else "") for kind, g in graphed.items()))
        if not is_gpu(setup.device):
            notes.append("diffkd-graphed: no CUDA graphs on a CPU, CUDAGraphHead runs the heads eagerly")
    section["tables"].append(make_table(
        f"{pair.description}, batch {batch}: one training step",
        ["method", "head path", "ms / step", "images/s", "time × vs KD", "GFLOP / image", "FLOPs × vs KD"], rows,
        notes))
    targets = target_rows({m: t.median_ms for m, t in timings.items()})
    if targets and "eager" in setup.path("diffkd-graphed"):
        section["notes"].append(f"{name}: the targets of the graphed step are not evaluated: its heads ran "
                                f"{setup.path('diffkd-graphed')}, not from CUDA graphs")
        targets = []
    if targets:
        section.setdefault("targets", {})[name] = targets
        section["tables"].append(make_table(
            f"{pair.description}: targets of the graphed step (same run)", ["ratio", "value", "target", "met"],
            [[t["ratio"], t["value"], t["target"], "yes" if t["met"] else "NO"] for t in targets],
            [f"{t['ratio']}: {t['meaning']}" for t in targets]))


def run_step_benchmark(results: Results, device, *, pairs=("imagenet", "cifar"), methods=None,
                       batch: int | None = None, plan: TimingPlan = TimingPlan(warmup=1, repeats=3, gpu_rep_ms=300),
                       count_flops: bool = True, check_equality: bool | None = None, deadline: float | None = None,
                       compile_reserve_s: float = COMPILE_RESERVE_S, section_name: str = "train_step") -> dict:
    """Per pair: the CUDAGraphHead equality check (default: on a GPU), then every method but diffkd-compile timed
    together; then diffkd-compile for each pair while at least ``compile_reserve_s`` seconds are left (its compile
    is the slow part), timed with the others of its pair again so that all ratios come from one round."""
    section = results.section(section_name)
    methods = tuple(methods) if methods is not None else default_methods(device)
    check_equality = is_gpu(device) if check_equality is None else check_equality
    section["notes"] += ["× vs KD: step time / KD step time (lower is better); FLOPs: matmul and convolution FLOPs "
                         "of forward+backward counted by torch.utils.flop_counter.FlopCounterMode on the eager "
                         "PyTorch heads (every DiffKD row does the same work)"]
    for method, why in method_availability(device).items():
        if why is not None and method not in methods:
            Results.skip(section, method, why)
    setups, timings, flops = {}, {}, {}
    for name in pairs:
        if time_left(deadline) <= 0:
            Results.skip(section, name, "deadline reached")
            continue
        pair = PAIRS[name]
        pair_batch = batch or (pair.gpu_batch if is_gpu(device) else pair.cpu_batch)
        try:
            print(f"train_step {name}: {pair.teacher} → {pair.student}, batch {pair_batch}", flush=True)
            setups[name] = setup = TrainingSetup(pair, pair_batch, device)
            if check_equality and "diffkd-graphed" in methods:
                print(f"train_step {name}: CUDAGraphHead against its eager twin, {EQUALITY_STEPS} steps (the first "
                      "captures: Triton compiles and autotunes its kernels) ...", flush=True)
                try:
                    report = check_graphed_against_eager(setup)
                    section.setdefault("graph_equality", {})[name] = report
                    section["tables"].append(equality_table(pair, report))
                except Exception as exc:  # recorded; the timings still run
                    Results.error(section, f"{name} / CUDAGraphHead vs eager", exc)
                results.flush()
            if count_flops:
                counted = [m for m in ("none", "kd", "diffkd-torch") if m in methods]
                flops[name] = {m: setup.flops(m) for m in counted}
            timed = [m for m in methods if m != "diffkd-compile"]
            print(f"train_step {name}: timing {', '.join(timed)} ...", flush=True)
            timings[name] = _time_methods(section, setup, name, timed, device, plan, deadline)
        except Exception as exc:  # one pair failing (e.g. out of memory) leaves the other
            Results.error(section, name, exc)
        results.flush()
    for name, setup in setups.items():
        if "diffkd-compile" not in methods or not timings.get(name):
            continue
        if time_left(deadline) < compile_reserve_s:
            Results.skip(section, f"{name} / diffkd-compile", f"less than {compile_reserve_s:.0f} s left to compile")
            continue
        print(f"train_step {name}: compiling the heads with torch.compile(mode='reduce-overhead') "
              f"(up to minutes) ...", flush=True)
        again = [m for m in timings[name] if m != "diffkd-compile"] + ["diffkd-compile"]
        retimed = _time_methods(section, setup, name, again, device, plan, deadline)
        if "diffkd-compile" in retimed:
            timings[name] = retimed
    for name, setup in setups.items():
        if timings.get(name):
            _pair_tables(section, name, setup, timings[name], flops.get(name, {}))
    section["status"] = "done"
    results.flush()
    return section


def main(argv=None) -> int:
    parser = _cli.script_parser(__doc__)
    parser.add_argument("--pairs", default="imagenet,cifar", help=f"comma-separated, from: {', '.join(PAIRS)}")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: those that run on the device)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every pair (default: 64 on a GPU; CPU: ImageNet 4, CIFAR 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds on the CPU (default 3)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    args = parser.parse_args(argv)
    pairs = [p for p in args.pairs.split(",") if p]
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    for values, known, flag in ((pairs, PAIRS, "--pairs"), (methods or [], METHODS, "--methods")):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.batch is not None and args.batch < 2:
        parser.error(f"--batch must be >= 2 (the heads' BatchNorm trains on the batch), got {args.batch}")
    device, results = _cli.prepare(args)
    section = run_step_benchmark(results, device, pairs=pairs, methods=methods, batch=args.batch,
                                 plan=TimingPlan(warmup=1, repeats=args.repeats, gpu_rep_ms=300, clock=args.clock),
                                 count_flops=not args.no_flops)
    print_section("train_step", section)
    return 1 if section["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
