"""Command-line plumbing shared by the benchmark scripts: device, threads, results file."""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks._report import Results, default_results_name
from benchmarks._timing import CLOCKS, card_slug, configure_cpu, configure_gpu_math, environment


def script_parser(doc: str, robust_cpu_defaults: bool = False) -> argparse.ArgumentParser:
    """A benchmark script's parser: its docstring as the description, and the flags every script shares."""
    # Whole flag names only: a prefix (--quic for --quick) would hide a typo in a script.
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add_common_arguments(parser, robust_cpu_defaults)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, robust_cpu_defaults: bool = False) -> None:
    """The flags every benchmark script shares.  With ``robust_cpu_defaults`` a CPU run defaults to one thread and
    the process's CPU time (``--threads 1 --clock cpu``), the mode that gives consistent numbers on a shared machine;
    ``prepare`` fills them in."""
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on the CPU (default: " + (
                            "1 for a CPU run" if robust_cpu_defaults else "every core") + "; recorded in the results)")
    parser.add_argument("--clock", choices=CLOCKS, default=None if robust_cpu_defaults else "wall",
                        help="CPU timing clock: wall or cpu = the process's CPU time, steady on a shared machine; "
                             "cpu needs --threads 1 (with more threads CPU time is not a call's duration); default: "
                             + ("cpu with one thread, else wall" if robust_cpu_defaults else "wall"))
    parser.set_defaults(robust_cpu_defaults=robust_cpu_defaults)
    parser.add_argument("--fp32-math", choices=("tf32", "ieee"), default="tf32",
                        help="GPU fp32 precision for every provider's convolutions and GEMMs (default tf32)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write results to PATH (JSON) and PATH with .md; a folder gets <card>-<date>.json. "
                             "Sections of other scripts already in the file are kept")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be cuda or cpu, got {name!r}")
    return device


def results_path(json_arg: str | None, device: torch.device) -> str | None:
    if json_arg is None:
        return None
    if os.path.isdir(json_arg) or json_arg.endswith(os.sep):
        return os.path.join(json_arg, default_results_name(card_slug(device)) + ".json")
    return json_arg


def prepare(args: argparse.Namespace) -> tuple[torch.device, Results]:
    """Resolves the device, configures CPU threads, opens the results file."""
    device = resolve_device(args.device)
    if getattr(args, "robust_cpu_defaults", False):  # one thread and CPU time unless the flags say otherwise
        if device.type == "cpu" and args.threads is None:
            args.threads = 1
        if args.clock is None:
            args.clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
        if device.type == "cpu":
            print(f"CPU timing: {args.threads} thread(s), {'process CPU time' if args.clock == 'cpu' else 'wall time'}"
                  + (" (steady on a shared machine; --threads N --clock wall to change)" if args.clock == "cpu"
                     else ""), flush=True)
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu measures the process's CPU time, which is a call's duration only with one "
                         "thread: add --threads 1")
    cpu_setup = configure_cpu(args.threads)
    if device.type == "cuda":
        configure_gpu_math(args.fp32_math == "tf32")
    meta = environment(device, args.clock)
    meta["malloc_tuned"] = cpu_setup["malloc_tuned"]
    return device, Results(results_path(args.json, device), meta)
