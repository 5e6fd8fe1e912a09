"""diffkd.cpu_features: native bfloat16 from the kernel's CPU flags, both ways, and the fallback without them."""
import pytest
import torch

from diffkd import cpu_features

SAPPHIRE_RAPIDS = "fpu vme avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
ICE_LAKE = "fpu vme avx2 avx512f avx512bw avx512_vnni"
ZEN4 = "fpu vme avx2 avx512f avx512_bf16"


def cpuinfo(*flag_lines: str) -> str:
    return "".join(f"processor\t: {i}\nmodel name\t: test\nflags\t\t: {flags}\nbogomips\t: 4000\n\n"
                   for i, flags in enumerate(flag_lines))


@pytest.mark.parametrize("text, native", [
    (cpuinfo(SAPPHIRE_RAPIDS, SAPPHIRE_RAPIDS), True),
    (cpuinfo(ZEN4), True),
    (cpuinfo("fpu amx_bf16 amx_tile"), True),
    (cpuinfo(ICE_LAKE, ICE_LAKE), False),
    (cpuinfo(SAPPHIRE_RAPIDS, ICE_LAKE), False),  # a thread may run on the core without it
    ("processor\t: 0\nFeatures\t: fp asimd bf16\n", False),  # no x86 flags line: fp32
    ("", False),
])
def test_native_bf16_from_cpuinfo_text(text, native):
    assert cpu_features.cpu_supports_native_bf16(text) is native


def test_flags_are_whole_words():
    assert cpu_features.cpu_flags(cpuinfo("avx512_bf16x amx_bf16_off")) == {"avx512_bf16x", "amx_bf16_off"}
    assert not cpu_features.cpu_supports_native_bf16(cpuinfo("avx512_bf16x amx_bf16_off"))


@pytest.mark.parametrize("flags, native", [(SAPPHIRE_RAPIDS, True), (ICE_LAKE, False)])
def test_reads_the_system_file(flags, native, tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo(flags))
    monkeypatch.setattr(cpu_features, "CPUINFO", path)
    assert cpu_features.cpu_supports_native_bf16() is native


@pytest.mark.parametrize("avx512_bf16, amx, native", [(True, False, True), (False, True, True), (False, False, False)])
def test_without_proc_cpuinfo_asks_torch(avx512_bf16, amx, native, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_features.cpu_supports_native_bf16() is native


def test_without_proc_cpuinfo_nor_torch_queries_says_no(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "CPUINFO", tmp_path / "absent")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert cpu_features.cpu_supports_native_bf16() is False
