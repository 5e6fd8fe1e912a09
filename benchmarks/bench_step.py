"""One training step (forward, backward, SGD step) for the student alone, KD and DiffKD; DiffKD's overhead over KD
in time and, beside it, in FLOPs (torch.utils.flop_counter; SPEC §8 expects ≈ 1.40 at ResNet-34 → ResNet-18).

Pairs: ResNet32x4 → ResNet8x4 at CIFAR shapes (batch 64, 32×32; feature head on layer3, 256 ch, 8×8, logit head
K 100), ResNet-34 → ResNet-18 at ImageNet shapes (batch 32 on a GPU, 4 on a CPU; feature head on layer4, 512 ch,
7×7, with the 1024-channel autoencoder; logit head K 1000).  Losses follow SPEC §6: KD = CE·w + KL·(1−w) at the
benchmark's τ; DiffKD = CE + both heads (KD + diffusion + AE, weight 1; logit head KL τ = 1).  Heads use
backend "auto" (Triton on a GPU, the PyTorch reference on a CPU) unless --backend says otherwise.

    python benchmarks/bench_step.py                         # both pairs
    python benchmarks/bench_step.py --pairs imagenet --batch 8 --repeats 5
"""
from __future__ import annotations

import argparse
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
from diffkd import DiffKDHead, kl_div_loss  # noqa: E402
from diffkd.models import FeatureTaps, create_model, default_taps, match_spatial, probe_taps  # noqa: E402

METHODS = ("student", "kd", "diffkd")


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
    "cifar": Pair("resnet32x4", "resnet8x4", 100, 32, 64, 64, 0.1, 4.0, 0.05, 5e-4, None,
                  "ResNet32x4 → ResNet8x4, CIFAR shapes (32×32)"),
    "imagenet": Pair("resnet34", "resnet18", 1000, 224, 32, 4, 0.5, 1.0, 0.1, 1e-4, 1024,
                     "ResNet-34 → ResNet-18, ImageNet shapes (224×224), feature head with AE 1024"),
    "tiny": Pair("resnet14", "resnet8", 10, 32, 4, 4, 0.1, 4.0, 0.05, 5e-4, None,
                 "tiny CIFAR pair ResNet14 → ResNet8 (dry runs and tests)"),
}


class TrainingSetup:
    """Teacher (eval, frozen), student and the two DiffKD heads of a pair, with one optimizer per method."""

    def __init__(self, pair: Pair, batch: int, device, backend: str):
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
            self.taps[role] = FeatureTaps(model, feature, logits)
        self.feature_head = DiffKDHead(shapes["student"][1], shapes["teacher"][1], use_ae=pair.ae_channels is not None,
                                       ae_channels=pair.ae_channels, backend=backend).to(device)
        self.logit_head = DiffKDHead(pair.num_classes, pair.num_classes, kernel_size=1, distance="kl",
                                     backend=backend).to(device)
        self.tap_names = {role: taps.feature_module for role, taps in self.taps.items()}
        self.feature_shapes = shapes
        self.images = torch.randn(batch, *input_size, device=device)
        self.labels = torch.randint(0, pair.num_classes, (batch,), device=device)
        heads = list(self.feature_head.parameters()) + list(self.logit_head.parameters())
        self.optimizers = {method: torch.optim.SGD(list(self.student.parameters()) + (heads if method == "diffkd"
                                                                                     else []),
                                                   lr=pair.lr, momentum=0.9, weight_decay=pair.weight_decay)
                           for method in METHODS}

    def step(self, method: str) -> torch.Tensor:
        """One training step of ``method``; returns the loss."""
        pair, optimizer = self.pair, self.optimizers[method]
        optimizer.zero_grad(set_to_none=True)
        if method != "student":
            with torch.no_grad():
                self.teacher(self.images)
            teacher_feature, teacher_logits = self.taps["teacher"].feature, self.taps["teacher"].logits
        logits = self.student(self.images)
        ce = F.cross_entropy(logits, self.labels)
        if method == "student":
            loss = ce
        elif method == "kd":
            loss = pair.kd_ce_weight * ce + (1 - pair.kd_ce_weight) * kl_div_loss(logits, teacher_logits,
                                                                                 pair.kd_temperature)
        else:
            student_feature, teacher_feature = match_spatial(self.taps["student"].feature, teacher_feature)
            loss = (ce + self.feature_head(student_feature, teacher_feature)["loss"]
                    + self.logit_head(logits, teacher_logits)["loss"])
        loss.backward()
        optimizer.step()
        return loss.detach()

    def flops(self, method: str) -> int:
        """Matmul/convolution FLOPs of one training step (forward and backward) as FlopCounterMode counts them."""
        register_kernel_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            self.step(method)
        return counter.get_total_flops()


def register_kernel_flops() -> None:
    """Teaches FlopCounterMode the two GEMM ops of the Triton 1×1 convolution (it counts aten's matmuls and
    convolutions only), so a step's FLOPs are the same whichever backend the heads run.  Idempotent."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    import kernels  # noqa: F401  (registers the torch.ops.diffkd operators)

    def gemm_flops(rows_shape, out_channels: int, in_channels: int) -> int:
        batch, _, height, width = rows_shape
        return 2 * batch * height * width * out_channels * in_channels

    forward = getattr(torch.ops.diffkd, "conv1x1", None)  # also computes dx, with the transposed weight
    if forward is not None and forward not in flop_registry:
        register_flop_formula(forward)(
            lambda x_shape, w_shape, *args, out_shape=None, **kwargs: gemm_flops(x_shape, w_shape[0], w_shape[1]))
    weight_grad = getattr(torch.ops.diffkd, "conv1x1_weight_grad", None)
    if weight_grad is not None and weight_grad not in flop_registry:
        register_flop_formula(weight_grad)(
            lambda grad_shape, x_shape, *args, out_shape=None, **kwargs: gemm_flops(x_shape, grad_shape[1],
                                                                                   x_shape[1]))


def run_step_benchmark(results: Results, device, *, pairs=("cifar", "imagenet"), batch: int | None = None,
                       plan: TimingPlan = TimingPlan(warmup=1, repeats=3, gpu_rep_ms=300), backend: str = "auto",
                       count_flops: bool = True,
                       deadline: float | None = None, section_name: str = "train_step") -> dict:
    section = results.section(section_name)
    section["notes"] += ["FLOPs: matmul and convolution FLOPs of forward+backward counted by "
                         "torch.utils.flop_counter.FlopCounterMode (BatchNorm and elementwise ops are not counted)",
                         "× vs KD: DiffKD step time / KD step time (lower is better; SPEC §8 FLOP floor ≈ 1.40 at "
                         "ResNet-34 → ResNet-18)"]
    for name in pairs:
        if time_left(deadline) <= 0:
            Results.skip(section, name, "deadline reached")
            continue
        pair = PAIRS[name]
        pair_batch = batch or (pair.gpu_batch if is_gpu(device) else pair.cpu_batch)
        try:
            setup = TrainingSetup(pair, pair_batch, device, backend)
            for method in METHODS:  # warm-up outside the timer (cuDNN / Triton compile on first use)
                setup.step(method)
            flops = {method: setup.flops(method) for method in METHODS} if count_flops else {}
            timings = time_candidates({method: (lambda m=method: setup.step(m)) for method in METHODS}, device, plan,
                                      deadline)
        except Exception as exc:  # one pair failing (e.g. out of memory) leaves the other
            Results.error(section, name, exc)
            results.flush()
            continue
        rows = []
        for method, timing in timings.items():
            time_ratio = timing.median_ms / timings["kd"].median_ms
            per_sample = flops[method] / pair_batch / 1e9 if flops else None
            flop_ratio = flops[method] / flops["kd"] if flops else None
            rows.append([method, timing.median_ms, pair_batch / timing.median_ms * 1e3, time_ratio, per_sample,
                         flop_ratio])
            section["records"].append({"pair": name, "method": method, "batch": pair_batch, **timing.as_dict(),
                                       "time_vs_kd": time_ratio, "gflop_per_sample": per_sample,
                                       "flops_vs_kd": flop_ratio})
        heads = (f"feature head on {setup.tap_names['student']} {setup.feature_shapes['student'][1:]} / "
                 f"{setup.tap_names['teacher']} {setup.feature_shapes['teacher'][1:]}, logit head K "
                 f"{pair.num_classes}; head backend {kernels_backend(backend, device)}")
        section["tables"].append(make_table(
            f"{pair.description}, batch {pair_batch}: one training step",
            ["method", "ms / step", "samples/s", "time × vs KD", "GFLOP / sample", "FLOPs × vs KD"], rows, [heads]))
        results.flush()
    section["status"] = "done"
    results.flush()
    return section


def kernels_backend(backend: str, device) -> str:
    import kernels

    probe = torch.empty(1, device=device)
    return kernels.resolve_backend(backend, probe)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _cli.add_common_arguments(parser)
    parser.add_argument("--pairs", default="cifar,imagenet", help=f"comma-separated, from: {', '.join(PAIRS)}")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every pair (default: 64 CIFAR; ImageNet 32 on a GPU, 4 on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds on the CPU (default 3)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="the heads' backend")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    args = parser.parse_args(argv)
    pairs = [p for p in args.pairs.split(",") if p]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"--pairs: unknown {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    if args.batch is not None and args.batch < 2:
        parser.error(f"--batch must be >= 2 (the heads' BatchNorm trains on the batch), got {args.batch}")
    device, results = _cli.prepare(args)
    section = run_step_benchmark(results, device, pairs=pairs, batch=args.batch,
                                 plan=TimingPlan(warmup=1, repeats=args.repeats, gpu_rep_ms=300, clock=args.clock),
                                 backend=args.backend, count_flops=not args.no_flops)
    print_section("train_step", section)
    return 1 if section["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
