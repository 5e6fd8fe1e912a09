"""Parity of the Triton kernels on a real GPU: the parity section of the one-call GPU check (gpu_check.py).

``run_parity(report, deadline)`` runs, with compiled kernels at real shapes (B 32-256, C 256-1024, 7×7 and 8×8),
every op's forward and gradients against the float64 reference (``kernels.testing.compare_with_fp64``): fp32 with
IEEE math, the 1×1-conv GEMM in fp32 with TF32 and in bf16/fp16 on tensor cores (bounded by twice PyTorch's own
error in the same mode), in-kernel noise against the Philox oracle, and a CUDA-graph capture of a 5-step chain
(forward and backward) whose replay must equal eager and whose noise must change when the seed tensors advance.
Each check's outcome (passed, max errors and bounds, seconds, or the traceback) goes into ``report["checks"]`` as
soon as it is known; one failing check never stops the others.  ``deadline`` is a ``time.monotonic()`` value;
checks not started by then are recorded as skipped.

On a CPU with ``TRITON_INTERPRET=1`` the same checks run at tiny shapes as a dry-run; the CUDA-only ones (graphs,
TF32, timings) are recorded as skipped with the reason.

    python -m benchmarks.parity OUTPUT_DIR [--budget 90]     # writes OUTPUT_DIR/parity-<device>.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels._common import interpreter_enabled  # noqa: E402
from kernels.testing import compare_with_fp64, philox_normal  # noqa: E402

NUM_TRAIN_TIMESTEPS = 1000
CHAIN_TIMESTEPS = (400, 300, 200, 100, 0)  # NFE 5, the official start


@dataclass(frozen=True)
class Shapes:
    map: tuple            # elementwise ops
    large_map: tuple      # the embedding step, at the largest real shape
    noise_map: tuple      # in-kernel noise against the (numpy) oracle
    convs: tuple          # ((x shape, C_out), ...) for the GEMM variants, used round-robin
    chain: tuple          # the CUDA-graph chain


GPU_SHAPES = Shapes(map=(128, 512, 7, 7), large_map=(256, 1024, 8, 8), noise_map=(32, 256, 7, 7),
                    convs=(((128, 1024, 7, 7), 256), ((64, 256, 8, 8), 1024)), chain=(64, 256, 7, 7))
DRY_RUN_SHAPES = Shapes(map=(2, 6, 3, 5), large_map=(3, 5, 4, 4), noise_map=(2, 3, 4, 5),
                        convs=(((2, 40, 3, 5), 24), ((2, 24, 4, 4), 40)), chain=(2, 8, 3, 3))


@dataclass(frozen=True)
class Context:
    device: torch.device
    shapes: Shapes

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def alphas_cumprod(device) -> torch.Tensor:
    """ᾱ of the linear schedule in float32, as DDIMScheduler builds it."""
    betas = torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    return torch.cumprod(1 - betas, 0).to(device)


def step_coefficients(table: torch.Tensor) -> list[tuple[float, float]]:
    """(A, B) of each chain step, computed in float64 from the float32 table."""
    abar = table.double().cpu()
    coefficients = []
    for t in CHAIN_TIMESTEPS:
        prev = abar[t - 100].item() if t >= 100 else 1.0
        now = abar[t].item()
        coefficients.append((math.sqrt(prev / now), math.sqrt(1 - prev) - math.sqrt(prev * (1 - now) / now)))
    return coefficients


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for both matmuls (the Triton GEMM follows this flag) and cuDNN convolutions (PyTorch's twin)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tensor(ctx: Context, shape, layout="contiguous", dtype=torch.float32, scale=1.0, requires_grad=True):
    t = (torch.randn(shape, device=ctx.device) * scale).to(dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def _summary(records: list[dict]) -> dict:
    return {"passed": all(r["passed"] for r in records), "records": records}


# ---- the checks: each returns {"passed": bool, ...} -------------------------------------------------------------
def check_ddim_step(ctx: Context, dtype, layout) -> dict:
    a, b = step_coefficients(alphas_cumprod("cpu"))[0]
    inputs = [_tensor(ctx, ctx.shapes.map, layout, dtype), _tensor(ctx, ctx.shapes.map, "contiguous", dtype)]
    return _summary(compare_with_fp64(lambda x, e: kernels.ddim_step(x, e, a, b, backend="triton"),
                                      lambda x, e: reference.ddim_step(x, e, a, b), inputs))


def check_ddim_step_embed(ctx: Context, dtype, layout) -> dict:
    a, b = step_coefficients(alphas_cumprod("cpu"))[0]
    shape = ctx.shapes.large_map
    inputs = [_tensor(ctx, shape, layout, dtype), _tensor(ctx, shape, layout, dtype),
              _tensor(ctx, (shape[1],), dtype=dtype)]
    return _summary(compare_with_fp64(lambda x, e, m: kernels.ddim_step_embed(x, e, a, b, m, backend="triton"),
                                      lambda x, e, m: reference.ddim_step_embed(x, e, a, b, m), inputs))


def check_noise_blend_explicit(ctx: Context, dtype, layout) -> dict:
    shape = ctx.shapes.map
    inputs = [_tensor(ctx, shape, layout, dtype), torch.rand(shape[0], device=ctx.device).to(dtype).requires_grad_(),
              _tensor(ctx, shape, "contiguous", dtype)]
    return _summary(compare_with_fp64(lambda z, g, n: kernels.noise_blend(z, g, n, backend="triton"),
                                      reference.noise_blend, inputs))


def check_in_kernel_noise_ops(ctx: Context, dtype) -> dict:
    """noise_blend, q_sample and squared_error_mean with seeds, against the reference fed the oracle's noise."""
    shape, seed = ctx.shapes.noise_map, 2 ** 40 + 17
    noise = philox_normal(seed, shape).to(ctx.device)
    table = alphas_cumprod(ctx.device)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (shape[0],), device=ctx.device)
    records = []
    z = _tensor(ctx, shape, "channels_last", dtype)
    gamma = torch.rand(shape[0], device=ctx.device).to(dtype).requires_grad_()
    for op, kernel_fn, reference_fn, inputs in [
        ("noise_blend", lambda z, g: kernels.noise_blend(z, g, seed=seed, backend="triton"),
         lambda z, g: reference.noise_blend(z, g, noise.to(z.dtype)), [z, gamma]),
        ("q_sample", lambda z: kernels.q_sample(z, t, table, seed=seed, backend="triton"),
         lambda z: reference.q_sample(z, t, table, noise.to(z.dtype)), [z]),
        ("squared_error_mean", lambda p: kernels.squared_error_mean(p, seed=seed, backend="triton"),
         lambda p: reference.squared_error_mean(p, noise.to(p.dtype)), [z]),
    ]:
        records += [dict(r, name=f"{op} {r['name']}") for r in compare_with_fp64(kernel_fn, reference_fn, inputs)]
    return _summary(records)


def check_squared_error_explicit(ctx: Context, dtype) -> dict:
    shape = ctx.shapes.map
    inputs = [_tensor(ctx, shape, "channels_last", dtype), _tensor(ctx, shape, "contiguous", dtype)]
    return _summary(compare_with_fp64(lambda p, q: kernels.squared_error_mean(p, q, backend="triton"),
                                      reference.squared_error_mean, inputs))


def check_noise_statistics(ctx: Context) -> dict:
    """Mean ≈ 0 and std ≈ 1 (5σ for the sample size), one seed → one noise, backward regenerates it exactly."""
    shape = ctx.shapes.large_map
    zeros, gamma0 = torch.zeros(shape, device=ctx.device), torch.zeros(shape[0], device=ctx.device)
    seed = torch.tensor([123], device=ctx.device)
    noise = kernels.noise_blend(zeros, gamma0, seed=seed, backend="triton")  # γ = 0: ε itself
    count = noise.numel()
    mean, std = noise.double().mean().item(), noise.double().std().item()
    repeat_equal = torch.equal(noise, kernels.noise_blend(zeros, gamma0, seed=seed, backend="triton"))
    seed.add_(1)
    advanced = kernels.noise_blend(zeros, gamma0, seed=seed, backend="triton")
    advanced_differs = (advanced - noise).abs().mean().item() > 0.5
    seed.sub_(1)
    z = _tensor(ctx, shape, "channels_last")
    gamma = torch.rand(shape[0], device=ctx.device, requires_grad=True)
    upstream = torch.randn(shape, device=ctx.device)
    seeded = torch.autograd.grad((kernels.noise_blend(z, gamma, seed=seed, backend="triton") * upstream).sum(),
                                 [z, gamma])
    explicit = torch.autograd.grad((kernels.noise_blend(z, gamma, noise, backend="triton") * upstream).sum(),
                                   [z, gamma])
    regenerated = all(torch.equal(s, e) for s, e in zip(seeded, explicit))
    mean_ok = abs(mean) < 5 / math.sqrt(count)
    std_ok = abs(std - 1) < 5 / math.sqrt(2 * count)
    return {"passed": mean_ok and std_ok and repeat_equal and advanced_differs and regenerated, "count": count,
            "mean": mean, "std": std, "same_seed_same_noise": repeat_equal, "advanced_seed_new_noise":
            advanced_differs, "backward_regenerates_forward_noise": regenerated}


def _conv1x1_as_matmul(x, weight, bias):
    return torch.einsum("bchw,oc->bohw", x, weight[:, :, 0, 0]) + bias[:, None, None]


def check_conv1x1(ctx: Context, dtype, layout, use_tf32: bool, shape_index: int) -> dict:
    x_shape, out_channels = ctx.shapes.convs[shape_index % len(ctx.shapes.convs)]
    in_channels = x_shape[1]
    inputs = [_tensor(ctx, x_shape, layout, dtype),
              _tensor(ctx, (out_channels, in_channels, 1, 1), dtype=dtype, scale=in_channels ** -0.5),
              _tensor(ctx, (out_channels,), dtype=dtype)]
    # PyTorch's own TF32 error is measured with cuBLAS (whose TF32 use the flag guarantees), not cuDNN.
    torch_twin = _conv1x1_as_matmul if use_tf32 else F.conv2d
    with tf32(use_tf32):
        records = compare_with_fp64(lambda x, w, b: kernels.conv1x1(x, w, b, backend="triton"), torch_twin, inputs,
                                    twice_torch=use_tf32 or dtype != torch.float32)
    out = kernels.conv1x1(*(t.detach() for t in inputs), backend="triton")
    keeps_format = out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                     else torch.contiguous_format)
    return {"passed": all(r["passed"] for r in records) and keeps_format, "x": list(x_shape),
            "c_out": out_channels, "keeps_memory_format": keeps_format, "records": records}


def check_conv1x1_speed(ctx: Context) -> dict:
    """Informative, for conv1x1's "auto" rule: forward time of the Triton GEMM and of cuDNN (bf16, NHWC)."""
    from triton.testing import do_bench
    results = []
    for x_shape, out_channels in ctx.shapes.convs:
        x = _tensor(ctx, x_shape, "channels_last", torch.bfloat16, requires_grad=False)
        w = _tensor(ctx, (out_channels, x_shape[1], 1, 1), dtype=torch.bfloat16, requires_grad=False)
        b = _tensor(ctx, (out_channels,), dtype=torch.bfloat16, requires_grad=False)
        triton_ms = do_bench(lambda: kernels.conv1x1(x, w, b, backend="triton"))
        cudnn_ms = do_bench(lambda: F.conv2d(x, w, b))
        results.append({"x": list(x_shape), "c_out": out_channels, "triton_ms": triton_ms, "cudnn_ms": cudnn_ms})
    return {"passed": True, "informative": True, "timings": results}


def _graph_chain_setup(ctx: Context):
    batch, channels, height, width = ctx.shapes.chain
    device = ctx.device
    params = {"weight": _tensor(ctx, (channels, channels, 1, 1), scale=channels ** -0.5),
              "bias": _tensor(ctx, (channels,), scale=0.1),
              "embedding": _tensor(ctx, (1280, channels), scale=0.1),
              "gamma_logit": torch.zeros(batch, device=device, requires_grad=True)}
    data = {"z": _tensor(ctx, ctx.shapes.chain, "channels_last", requires_grad=False),
            "target": _tensor(ctx, ctx.shapes.chain, "channels_last", requires_grad=False),
            "t": torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), device=device),
            "blend_seed": torch.tensor([11], device=device), "diffusion_seed": torch.tensor([12], device=device),
            "table": alphas_cumprod(device)}
    return params, data


def _chain_step(params: dict, data: dict, coefficients) -> torch.Tensor:
    """Blend (seeded) → 5 DDIM steps with ε̂ = conv1x1(x + E[t]) → KD loss + seeded diffusion loss; backward."""
    def eps_hat(model_input):
        return kernels.conv1x1(model_input, params["weight"], params["bias"], backend="triton")

    embedding = params["embedding"]
    gamma = torch.sigmoid(params["gamma_logit"])
    x = kernels.noise_blend(data["z"], gamma, seed=data["blend_seed"], backend="triton")
    model_input = x + embedding[CHAIN_TIMESTEPS[0]][:, None, None]
    for k, (a, b) in enumerate(coefficients):
        if k + 1 < len(coefficients):
            x, model_input = kernels.ddim_step_embed(x, eps_hat(model_input), a, b,
                                                     embedding[CHAIN_TIMESTEPS[k + 1]], backend="triton")
        else:
            x = kernels.ddim_step(x, eps_hat(model_input), a, b, backend="triton")
    kd_loss = kernels.squared_error_mean(x, data["target"], backend="triton")
    noisy = kernels.q_sample(data["target"], data["t"], data["table"], seed=data["diffusion_seed"], backend="triton")
    diffusion_loss = kernels.squared_error_mean(eps_hat(noisy), seed=data["diffusion_seed"], backend="triton")
    loss = kd_loss + diffusion_loss
    loss.backward()
    return loss


def _eager_chain(params, data, coefficients):
    for p in params.values():
        p.grad = None
    loss = _chain_step(params, data, coefficients).detach().clone()
    return loss, {name: p.grad.detach().clone() for name, p in params.items()}


def _max_difference(first: dict, second: dict) -> float:
    return max((first[k] - second[k]).abs().max().item() for k in first)


def check_chain_eager(ctx: Context) -> dict:
    """The chain used for the graph check, eagerly: deterministic for fixed seeds, new noise for new seeds."""
    params, data = _graph_chain_setup(ctx)
    coefficients = step_coefficients(data["table"])
    first_loss, first_grads = _eager_chain(params, data, coefficients)
    second_loss, second_grads = _eager_chain(params, data, coefficients)
    deterministic = torch.equal(first_loss, second_loss) and all(torch.equal(first_grads[k], second_grads[k])
                                                                 for k in first_grads)
    data["blend_seed"].add_(1)
    data["diffusion_seed"].add_(1)
    advanced_loss, _ = _eager_chain(params, data, coefficients)
    finite = all(torch.isfinite(g).all().item() for g in first_grads.values())
    noise_changed = advanced_loss.item() != first_loss.item()
    return {"passed": deterministic and noise_changed and finite, "loss": first_loss.item(),
            "bitwise_deterministic": deterministic, "advanced_seeds_change_loss": noise_changed,
            "finite_gradients": finite}


def check_cuda_graph_chain(ctx: Context) -> dict:
    """Capture forward+backward of the chain; replay == eager; advancing the seeds changes the noise."""
    params, data = _graph_chain_setup(ctx)
    coefficients = step_coefficients(data["table"])
    with tf32(False):
        eager_loss, eager_grads = _eager_chain(params, data, coefficients)  # also runs the autotuner
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for p in params.values():
                    p.grad = None
                _chain_step(params, data, coefficients)
        torch.cuda.current_stream().wait_stream(side)
        for p in params.values():
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = _chain_step(params, data, coefficients)
        graph.replay()
        torch.cuda.synchronize()
        replay_loss = static_loss.detach().clone()
        replay_grads = {name: p.grad.detach().clone() for name, p in params.items()}
        replay_error = max(abs(replay_loss.item() - eager_loss.item()), _max_difference(replay_grads, eager_grads))
        bitwise = torch.equal(replay_loss, eager_loss) and all(torch.equal(replay_grads[k], eager_grads[k])
                                                               for k in eager_grads)

        data["blend_seed"].add_(1)
        data["diffusion_seed"].add_(1)
        graph.replay()
        torch.cuda.synchronize()
        advanced_loss = static_loss.detach().clone()
        advanced_grads = {name: p.grad.detach().clone() for name, p in params.items()}
        noise_changed = advanced_loss.item() != replay_loss.item()
        eager_advanced_loss, eager_advanced_grads = _eager_chain(params, data, coefficients)
        advanced_error = max(abs(advanced_loss.item() - eager_advanced_loss.item()),
                             _max_difference(advanced_grads, eager_advanced_grads))
    scale = max(g.abs().max().item() for g in eager_grads.values())
    tolerance = 1e-5 * max(scale, abs(eager_loss.item()))
    return {"passed": replay_error <= tolerance and advanced_error <= tolerance and noise_changed,
            "shape": list(ctx.shapes.chain), "loss": eager_loss.item(), "replay_max_difference": replay_error,
            "replay_bitwise_equal": bitwise, "advanced_seeds_change_loss": noise_changed,
            "loss_after_seed_advance": advanced_loss.item(), "advanced_replay_max_difference": advanced_error,
            "tolerance": tolerance}


def _checks(ctx: Context):
    """(name, callable, reason it cannot run here or None)."""
    gpu_only = None if ctx.on_gpu else "needs a CUDA GPU"
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return [
        ("ddim_step/fp32/contiguous", lambda: check_ddim_step(ctx, f32, "contiguous"), None),
        ("ddim_step/fp32/channels_last", lambda: check_ddim_step(ctx, f32, "channels_last"), None),
        ("ddim_step/bf16/channels_last", lambda: check_ddim_step(ctx, bf16, "channels_last"), None),
        ("ddim_step_embed/fp32/channels_last", lambda: check_ddim_step_embed(ctx, f32, "channels_last"), None),
        ("ddim_step_embed/bf16/contiguous", lambda: check_ddim_step_embed(ctx, bf16, "contiguous"), None),
        ("noise_blend/fp32/channels_last", lambda: check_noise_blend_explicit(ctx, f32, "channels_last"), None),
        ("noise_blend/bf16/contiguous", lambda: check_noise_blend_explicit(ctx, bf16, "contiguous"), None),
        ("in_kernel_noise_ops/fp32", lambda: check_in_kernel_noise_ops(ctx, f32), None),
        ("in_kernel_noise_ops/bf16", lambda: check_in_kernel_noise_ops(ctx, bf16), None),
        ("squared_error_mean/fp32", lambda: check_squared_error_explicit(ctx, f32), None),
        ("noise_statistics", lambda: check_noise_statistics(ctx), None),
        ("conv1x1/fp32-ieee/contiguous", lambda: check_conv1x1(ctx, f32, "contiguous", False, 0), None),
        ("conv1x1/fp32-tf32/channels_last", lambda: check_conv1x1(ctx, f32, "channels_last", True, 1),
         gpu_only and "TF32 exists only on a GPU"),
        ("conv1x1/bf16/channels_last", lambda: check_conv1x1(ctx, bf16, "channels_last", False, 0), None),
        ("conv1x1/bf16/contiguous", lambda: check_conv1x1(ctx, bf16, "contiguous", False, 1), None),
        ("conv1x1/fp16/channels_last", lambda: check_conv1x1(ctx, f16, "channels_last", False, 1), None),
        ("chain_eager", lambda: check_chain_eager(ctx), None),
        ("cuda_graph_chain", lambda: check_cuda_graph_chain(ctx), gpu_only),
        ("conv1x1_speed_vs_cudnn", lambda: check_conv1x1_speed(ctx), gpu_only),
    ]


def _device_and_shapes() -> tuple[torch.device | None, Shapes | None, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), GPU_SHAPES, f"gpu: {torch.cuda.get_device_name()}"
    if interpreter_enabled():
        return torch.device("cpu"), DRY_RUN_SHAPES, "dry-run: Triton interpreter on the CPU, tiny shapes"
    return None, None, "no CUDA GPU and TRITON_INTERPRET is not 1: the kernels cannot run here"


def run_parity(report: dict, deadline: float) -> dict:
    """Runs every check, recording each into ``report["checks"]`` as it finishes; returns ``report``."""
    import triton

    device, shapes, mode = _device_and_shapes()
    report.update({"mode": mode, "torch": torch.__version__, "triton": triton.__version__, "checks": {}})
    if device is None:
        report["passed"] = False
        return report
    ctx = Context(device, shapes)
    torch.manual_seed(0)
    for name, check, unavailable in _checks(ctx):
        if unavailable:
            report["checks"][name] = {"skipped": unavailable}
            continue
        if time.monotonic() > deadline:
            report["checks"][name] = {"skipped": "deadline reached"}
            continue
        started = time.monotonic()
        try:
            outcome = check()
        except Exception:  # one failing check must not stop the others: record it and go on
            outcome = {"passed": False, "error": traceback.format_exc()}
        if ctx.on_gpu:
            torch.cuda.synchronize()
        outcome["seconds"] = round(time.monotonic() - started, 3)
        report["checks"][name] = outcome
    ran = [c for c in report["checks"].values() if "skipped" not in c]
    report["passed"] = bool(ran) and all(c["passed"] for c in ran)
    report["skipped"] = sorted(name for name, c in report["checks"].items() if "skipped" in c)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder for parity-<device>.json")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds before remaining checks are skipped")
    args = parser.parse_args(argv)
    report = run_parity({}, time.monotonic() + args.budget)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter"
    path = args.output_dir / f"parity-{device_name.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    failed = [name for name, c in report["checks"].items() if "skipped" not in c and not c["passed"]]
    print(f"parity: {'PASSED' if report['passed'] else 'FAILED'} ({len(failed)} failed: {failed}) -> {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    if not torch.cuda.is_available() and not interpreter_enabled():
        # A CPU dry-run needs Triton's interpreter, chosen before Triton is imported: rerun this command with it.
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, TRITON_INTERPRET="1"))
    raise SystemExit(main())
