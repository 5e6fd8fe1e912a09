"""Does this CPU compute in bfloat16 natively?

On x86 CPUs with AVX-512 BF16 or AMX-BF16 (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later),
oneDNN runs convolutions and matrix products in bfloat16 directly, and ``torch.autocast("cpu",
dtype=torch.bfloat16)`` is faster than float32.  Elsewhere bfloat16 is emulated and usually slower than float32
(PyTorch's AMP documentation says to check ``/proc/cpuinfo`` for ``avx512_bf16`` before using it).

The check reads the instruction-set flags the Linux kernel reports in ``/proc/cpuinfo``: they list only what
both the processor and the kernel support (AMX needs the kernel's permission to use its registers).  Where that
file does not exist (macOS, Windows) it asks PyTorch's own CPU capability queries, and says False if there are
none.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Either one is enough for oneDNN's bfloat16 convolutions and GEMMs.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags every processor in ``cpuinfo`` (the text of /proc/cpuinfo) reports.

    On a hybrid CPU whose cores differ, a flag counts only if every core has it: a thread may run on any core.
    """
    per_processor = [set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
                     if line.split(":", 1)[0].strip() == "flags" and ":" in line]
    return set.intersection(*per_processor) if per_processor else set()


def _torch_reports_native_bf16() -> bool:
    """PyTorch's capability queries (private, present in recent releases), for systems without /proc/cpuinfo."""
    queries = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(query() for query in queries if query is not None)


def cpu_supports_native_bf16(cpuinfo: str | None = None) -> bool:
    """True if the CPU runs bfloat16 arithmetic natively (AVX-512 BF16 or AMX-BF16), so bfloat16 autocast pays.

    ``cpuinfo`` is the text of /proc/cpuinfo (read from the system when None).
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return _torch_reports_native_bf16()
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)
