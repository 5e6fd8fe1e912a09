"""The benchmark scripts' CPU paths: gpu_check.py's dry run, the naive head's equality with ours, and the
smallest configurations of bench_ddim.py and bench_step.py (timings here are plumbing, never asserted)."""
import datetime
import inspect
import json
import math
import types

import pytest
import torch

from benchmarks import bench_ddim, bench_step, gpu_check
from benchmarks._report import LivePrinter, Results, add_row, make_table, render_section, skipped_lines
from benchmarks._timing import TimingPlan, time_interleaved
from benchmarks.naive_head import (CHECKED_ERRORS, NaiveDiffKDHead, PaperScheduler, compare_heads, diffusers_available,
                                   explicit_noises, worst_error)
from diffkd import DiffKDHead
from diffkd.graphs import relative_error

TODAY = datetime.date.today().isoformat()
SCHEDULERS = [pytest.param(True, id="diffusers", marks=pytest.mark.skipif(not diffusers_available(),
                                                                          reason="diffusers is not installed")),
              pytest.param(False, id="diffkd-fallback")]
TINY_HEADS = {
    "feature": (dict(student_channels=16, teacher_channels=24), (4, 16, 4, 4), (4, 24, 4, 4)),
    "feature-ae": (dict(student_channels=16, teacher_channels=24, use_ae=True, ae_channels=32), (4, 16, 3, 3),
                   (4, 24, 3, 3)),
    "logit": (dict(student_channels=10, teacher_channels=10, kernel_size=1, distance="kl"), (4, 10), (4, 10)),
}


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts set torch's thread count; give the rest of the test session its own back."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _sections(path):
    return json.loads(path.read_text())["sections"]


# ---- the naive head: same weights, same noises -> same losses and gradients ------------------------------------
@pytest.mark.parametrize("use_diffusers", SCHEDULERS)
@pytest.mark.parametrize("kind", list(TINY_HEADS))
def test_naive_head_equals_ours(kind, use_diffusers):
    kwargs, student_shape, teacher_shape = TINY_HEADS[kind]
    head = DiffKDHead(**kwargs, backend="torch")
    naive = NaiveDiffKDHead.from_head(head, PaperScheduler(use_diffusers=use_diffusers))
    student, teacher = torch.randn(student_shape), torch.randn(teacher_shape)
    errors = compare_heads(head, naive, student, teacher, explicit_noises(head, student, teacher))
    assert set(CHECKED_ERRORS) <= set(errors)
    assert max(errors.values()) < 1e-4, errors  # at tiny shapes even the single worst parameter agrees


def test_naive_head_comparison_detects_a_different_head():
    kwargs, student_shape, teacher_shape = TINY_HEADS["feature"]
    head = DiffKDHead(**kwargs, backend="torch")
    naive = NaiveDiffKDHead.from_head(head, PaperScheduler(use_diffusers=False))
    with torch.no_grad():
        naive.trans.weight.add_(0.1 * torch.randn_like(naive.trans.weight))  # no BatchNorm follows trans
    student, teacher = torch.randn(student_shape), torch.randn(teacher_shape)
    errors = compare_heads(head, naive, student, teacher, explicit_noises(head, student, teacher))
    assert errors["losses"] > 1e-3 and errors["param_grads"] > 1e-3


def test_naive_head_refuses_a_configuration_it_does_not_mirror():
    with pytest.raises(ValueError, match="use_anm=True"):
        NaiveDiffKDHead.from_head(DiffKDHead(16, 16, use_anm=False, backend="torch"))


def test_fallback_scheduler_says_so():
    assert "diffusers is not installed" in PaperScheduler(use_diffusers=False).source


# ---- gpu_check.py: the CPU dry run ------------------------------------------------------------------------------
def test_gpu_check_dry_run_writes_every_section(tmp_path, capsys):
    # The parity section is the kernels' own (and tested with them); its guard is tested below.
    sections_run = [s for s in gpu_check.SECTIONS if s != "parity"]
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--sections", ",".join(sections_run)]) == 0
    path = tmp_path / f"cpu-dryrun-{TODAY}.json"
    data = json.loads(path.read_text())
    sections = data["sections"]
    markdown = path.with_suffix(".md").read_text()
    assert list(sections) == sections_run
    for name, section in sections.items():
        assert section["status"] == "done", name
        assert section["errors"] == [], (name, section["errors"])
        assert section["tables"] and all(table["rows"] for table in section["tables"]), name
        assert f"## {name}" in markdown
    chain_providers = {r["provider"] for r in sections["chain"]["records"]}
    assert {"eager", "triton"} <= chain_providers  # tests run Triton's interpreter (conftest)
    assert all(r["rel_error"] <= bench_ddim.TOLERANCE[("cpu", r["dtype"])] for r in sections["chain"]["records"])
    head_checks = {r["provider"]: r["check"] for r in sections["head"]["records"] if "check" in r}
    assert {"naive", "ours-triton"} <= set(head_checks)
    assert all(worst_error(check) < 1e-4 for check in head_checks.values())
    skipped = " ".join(entry["what"] for entry in sections["chain"]["skipped"])
    assert "triton-graph" in skipped  # no CUDA graphs on a CPU, and the script says so

    train = sections["train_step"]
    steps = {r["method"]: r for r in train["records"]}
    assert set(steps) == set(gpu_check.DRY_RUN_MATRIX["step_methods"])
    assert steps["diffkd-torch"]["flops_vs_kd"] > 1 > steps["none"]["flops_vs_kd"]
    assert steps["diffkd-graphed"]["head_path"] == "eager torch"  # no CUDA graphs on a CPU: the heads run eagerly
    equality = train["graph_equality"]["tiny"]
    assert equality["passed"] and set(equality["heads"]) == {"feature", "logit"}
    assert all(h["num_batches_tracked"] == bench_step.EQUALITY_STEPS for h in equality["heads"].values())
    assert {e["what"] for e in train["skipped"]} >= {"diffkd-compile", "diffkd-triton"}
    assert "targets" not in train and any("not evaluated" in note for note in train["notes"])
    assert data["summary"][0].startswith("train_step tiny: CUDAGraphHead vs eager twin over 3 steps PASSED")
    out = capsys.readouterr().out
    assert out.index("--- train_step") < out.index("--- head") and "=== summary" in out


def test_gpu_check_runs_the_graphed_training_step_first_then_the_graph_tests_then_parity():
    assert gpu_check.SECTIONS[:3] == ("train_step", "graphs", "parity")
    assert gpu_check.GPU_MATRIX["step_pairs"] == ("imagenet", "cifar") and gpu_check.GPU_MATRIX["step_methods"] is None
    assert bench_step.PAIRS["imagenet"].gpu_batch == bench_step.PAIRS["cifar"].gpu_batch == 64
    assert sum(gpu_check.SECTION_BUDGETS_S.values()) == gpu_check.DEFAULT_DEADLINE_S


def test_targets_of_the_graphed_step_come_from_one_runs_timings():
    rows = {r["ratio"]: r for r in bench_step.target_rows(
        {"kd": 10.0, "diffkd-graphed": 14.0, "diffkd-paper": 17.5, "diffkd-compile": 17.5})}
    assert rows["graphed DiffKD step / KD step"]["value"] == pytest.approx(1.4)
    assert rows["graphed DiffKD step / KD step"]["met"]
    assert rows["paper's code / graphed (speed-up)"]["value"] == pytest.approx(1.25)
    assert not rows["paper's code / graphed (speed-up)"]["met"]
    assert rows["reduce-overhead compile / graphed (speed-up)"]["met"]
    assert [r["ratio"] for r in bench_step.target_rows({"kd": 1.0, "diffkd-graphed": 2.0})] == [
        "graphed DiffKD step / KD step"]


def test_gpu_check_summary_names_the_verdicts():
    sections = {
        "train_step": {"graph_equality": {"imagenet": {"steps": 3, "passed": False, "heads": {
            "feature": {"worst": 0.5, "path": "eager torch", "fallback_reason": "capturing raised X"}}}},
            "graphed_heads": {"imagenet": {"feature": {"path": "graphed Triton", "self_checks_passed": [True]}}},
            "targets": {"imagenet": bench_step.target_rows({"kd": 10.0, "diffkd-graphed": 16.0})}},
        "parity": {"report": {"passed": True}, "status": "done"},
        "chain": {"status": "skipped", "skipped": [{"what": "chain", "why": "not enough time left (0 s)"}]},
    }
    lines = gpu_check.summary_lines(sections)
    assert "FAILED (worst relative error 0.5); feature head eager torch (fell back: capturing raised X)" in lines[0]
    assert lines[1] == "train_step imagenet: timed CUDAGraphHead heads ran graphed Triton; self-check passed"
    assert "graphed DiffKD step / KD step 1.60 (target ≤ 1.5: NOT met)" in lines[2]
    assert lines[3:] == ["parity: PASSED", "chain: skipped (not enough time left (0 s))"]


def _fake_parity(run_parity):
    module = types.ModuleType("benchmarks.parity")
    module.run_parity = run_parity
    return module


def test_gpu_check_survives_a_failing_parity_and_keeps_its_partial_report(tmp_path, monkeypatch):
    def run_parity(report, deadline):
        assert deadline > 0
        report["checks"] = {"ddim_step/fp32": {"passed": True, "seconds": 0.1}}
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(__import__("sys").modules, "benchmarks.parity", _fake_parity(run_parity))
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--sections", "parity,step_kernel"]) == 0
    sections = _sections(tmp_path / f"cpu-dryrun-{TODAY}.json")
    parity = sections["parity"]
    assert parity["status"] == "error" and "kernel exploded" in parity["errors"][0]["error"]
    assert parity["report"]["checks"]["ddim_step/fp32"]["passed"] is True
    assert parity["tables"][0]["rows"][0][:2] == ["ddim_step/fp32", "passed"]
    assert sections["step_kernel"]["status"] == "done"


def test_gpu_check_without_a_parity_module_runs_the_benchmarks(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "benchmarks.parity", None)  # import raises ImportError
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--sections", "parity,step_kernel"]) == 0
    sections = _sections(tmp_path / f"cpu-dryrun-{TODAY}.json")
    assert sections["parity"]["status"] == "unavailable"
    assert "benchmarks.parity" in sections["parity"]["errors"][0]["what"]
    assert sections["step_kernel"]["status"] == "done"


def test_the_parity_module_has_the_interface_gpu_check_calls():
    from benchmarks.parity import run_parity

    assert list(inspect.signature(run_parity).parameters) == ["report", "deadline"]


def test_gpu_check_refuses_a_cpu_run_without_dry_run(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path)])
    assert "--dry-run" in capsys.readouterr().err


def test_gpu_check_deadline_skips_what_does_not_fit(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--deadline", "0.001",
                           "--sections", "chain,train_step"]) == 0
    sections = _sections(tmp_path / f"cpu-dryrun-{TODAY}.json")
    assert all(section["status"] == "skipped" and "time left" in section["skipped"][0]["why"]
               for section in sections.values())


# ---- bench_ddim.py and bench_step.py, smallest CPU configurations, into one results file ------------------------
def test_bench_ddim_and_bench_step_share_one_results_file(tmp_path):
    path = tmp_path / "cpu.json"
    assert bench_ddim.main(["--quick", "--providers", "diffusers,eager", "--repeats", "1", "--threads", "1",
                            "--sweep-mb", "1", "--json", str(path)]) == 0
    assert bench_step.main(["--pairs", "tiny", "--methods", "none,kd,diffkd-torch", "--repeats", "1", "--threads",
                            "1", "--no-flops", "--json", str(path)]) == 0
    sections = _sections(path)
    assert set(sections) == {"chain", "step_kernel", "train_step"}
    chain = sections["chain"]["records"]
    expected = {(shape, mode, provider) for shape in bench_ddim.QUICK_SHAPES for mode in bench_ddim.MODES
                for provider in (["diffusers"] if diffusers_available() else []) + ["eager"]}
    assert {(r["shape"], r["mode"], r["provider"]) for r in chain} == expected
    assert all(r["median_ms"] > 0 and r["speedup_vs_eager"] > 0 for r in chain)
    assert sections["step_kernel"]["copy_bandwidth_gbs"] > 0
    assert {r["method"] for r in sections["train_step"]["records"]} == {"none", "kd", "diffkd-torch"}
    assert "## train_step" in path.with_suffix(".md").read_text()


def test_bench_ddim_times_one_thread_cpu_time_on_a_cpu_unless_told(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    for extra, threads, clock in (([], 1, "process CPU time"), (["--threads", "2"], 2, "wall time"),
                                  (["--clock", "wall"], 1, "wall time")):
        path = tmp_path / f"{threads}-{clock}.json"
        # One provider: the chain says so instead of timing, so this costs nothing.
        assert bench_ddim.main(["--quick", "--no-sweep", "--providers", "eager", "--json", str(path)] + extra) == 0
        data = json.loads(path.read_text())
        assert data["meta"]["torch_threads"] == threads and clock in data["meta"]["timing"], extra
        assert data["sections"]["chain"]["single_provider"] == "eager" and data["sections"]["chain"]["tables"] == []
    out = capsys.readouterr().out
    assert "CPU timing: 1 thread(s), process CPU time" in out
    assert "only eager runs on this device, so the chain has nothing to compare and was not timed" in out


def test_bench_ddim_quick_leaves_torch_compile_out(monkeypatch):
    calls = {}

    def fake_section(name):
        def run(results, device, **kwargs):
            calls[name] = kwargs
            return {"errors": []}
        return run
    monkeypatch.setattr(bench_ddim, "run_chain_benchmark", fake_section("chain"))
    monkeypatch.setattr(bench_ddim, "run_step_kernel_benchmark", fake_section("step_kernel"))
    assert bench_ddim.main(["--quick", "--threads", "1"]) == 0
    assert "compile" not in calls["chain"]["providers"] and "compile" in calls["chain"]["left_out"]
    assert calls["chain"]["live"] and calls["step_kernel"]["live"]
    assert bench_ddim.main(["--quick", "--threads", "1", "--providers", "eager,compile"]) == 0
    assert calls["chain"]["providers"] == ("eager", "compile") and calls["chain"]["left_out"] == {}


def test_step_kernel_section_with_a_single_provider_times_nothing(monkeypatch):
    monkeypatch.setattr(bench_ddim, "interpreter_enabled", lambda: False)
    results = Results(None, {})
    section = bench_ddim.run_step_kernel_benchmark(results, "cpu", sizes_mb=(1,), real_shapes=((4, 16, 4),))
    assert section["single_provider"] == "torch" and section["tables"] == [] and section["records"] == []
    assert section["status"] == "done" and [e["what"] for e in section["skipped"]] == ["triton"]


def test_live_printer_prints_each_row_as_it_is_added(capsys):
    section = Results(None, {}).section("demo")
    section["notes"].append("first note")
    printer = LivePrinter("demo", section)
    printer.start()
    table = make_table("demo table", ["a", "b"], [])
    add_row(table, ["x", 1.5])
    printer.row(table)
    first = capsys.readouterr().out
    assert "## demo" in first and "- first note" in first and "### demo table" in first and "| x | 1.50 |" in first
    add_row(table, ["y", 2.0])
    printer.row(table)
    assert capsys.readouterr().out.strip() == "| y | 2.00 |"  # the header once, then one line per row
    section["notes"].append("late note")
    Results.skip(section, "z", "why")
    printer.end()
    assert capsys.readouterr().out.split() == "- late note - skipped z: why".split()
    LivePrinter("quiet", section, enabled=False).start()
    assert capsys.readouterr().out == ""


def test_repeated_skips_collapse_into_one_line_per_reason():
    skipped = [{"what": f"case {i} / triton-graph", "why": "CUDA graphs need a CUDA GPU"} for i in range(6)]
    skipped.insert(2, {"what": "compile", "why": "left out"})
    assert skipped_lines(skipped) == [
        "- skipped case 0 / triton-graph, case 1 / triton-graph, case 2 / triton-graph, case 3 / triton-graph and "
        "2 more: CUDA graphs need a CUDA GPU",
        "- skipped compile: left out"]
    assert render_section("s", {"skipped": skipped}).count("skipped") == 2


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "feature-256-7"], "feature-C-SIDE-B"),
    (["--dtypes", "fp64"], "--dtypes"),
    (["--providers", "tensorrt"], "--providers"),
])
def test_bench_ddim_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_ddim.main(argv + ["--threads", "1"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1"], "--batch must be >= 2"),
    (["--methods", "kd,diffkd-fast"], "--methods: unknown diffkd-fast"),
])
def test_bench_step_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_step.main(["--pairs", "tiny"] + argv)
    assert message in capsys.readouterr().err


# ---- the shared timing and results helpers ----------------------------------------------------------------------
def test_interleaved_timing_runs_every_candidate_every_round():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    timings = time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, plan=TimingPlan(warmup=0, repeats=3))
    assert {name: t.runs for name, t in timings.items()} == {"a": 3, "b": 3}
    assert all(t.q25_ms <= t.median_ms <= t.q75_ms for t in timings.values())
    assert calls["a"] == calls["b"] >= 3


def test_timing_plan_and_relative_error_refuse_nonsense():
    with pytest.raises(ValueError, match="repeats >= 1"):
        TimingPlan(repeats=0)
    x = torch.randn(3, 4)
    assert relative_error(x, x) == 0
    assert relative_error(x, x.t()) == math.inf
    assert relative_error(torch.full_like(x, math.nan), x) == math.inf


def test_results_file_keeps_sections_of_other_scripts(tmp_path):
    path = tmp_path / "r.json"
    first = Results(path, {"run": 1})
    first.section("a")["notes"].append("kept")
    first.flush()
    second = Results(path, {"run": 2})
    second.section("b")
    second.flush()
    data = json.loads(path.read_text())
    assert set(data["sections"]) == {"a", "b"} and data["meta"] == {"run": 2}
    assert data["sections"]["a"]["notes"] == ["kept"]
