"""benchmarks/parity.py's dry-run: the GPU parity checks at tiny shapes in Triton's interpreter."""
import json
import time

import pytest

from benchmarks import parity


def test_dry_run_passes_and_writes_its_report(tmp_path):
    assert parity.main([str(tmp_path)]) == 0
    (path,) = tmp_path.glob("parity-*.json")
    report = json.loads(path.read_text())
    assert report["passed"] and report["mode"].startswith("dry-run")
    checks = report["checks"]
    assert checks["cuda_graph_chain"] == {"skipped": "needs a CUDA GPU"}
    assert checks["conv1x1/fp32-tf32/channels_last"] == {"skipped": "TF32 exists only on a GPU"}
    ran = {name: check for name, check in checks.items() if "skipped" not in check}
    assert len(ran) >= 15 and all(check["passed"] for check in ran.values())
    assert all(record["passed"] for record in ran["conv1x1/bf16/channels_last"]["records"])


def test_a_failing_check_is_recorded_and_the_others_still_run(monkeypatch):
    def broken(ctx, dtype, layout):
        raise RuntimeError("simulated kernel failure")
    monkeypatch.setattr(parity, "check_ddim_step", broken)
    monkeypatch.setattr(parity, "_checks", lambda ctx: [
        ("broken", lambda: parity.check_ddim_step(ctx, None, None), None),
        ("statistics", lambda: parity.check_noise_statistics(ctx), None)])
    report = parity.run_parity({}, time.monotonic() + 60)
    assert not report["passed"]
    assert "simulated kernel failure" in report["checks"]["broken"]["error"]
    assert report["checks"]["statistics"]["passed"]


def test_checks_after_the_deadline_are_skipped():
    report = parity.run_parity({}, time.monotonic() - 1)
    assert all("skipped" in check for check in report["checks"].values())
    assert not report["passed"]


@pytest.mark.parametrize("start, expected", [(400, (1.42670, -0.50274)), (0, (1.00005, -0.01000))])
def test_chain_coefficients_match_the_spec_oracle(start, expected):
    a, b = parity.step_coefficients(parity.alphas_cumprod("cpu"))[parity.CHAIN_TIMESTEPS.index(start)]
    assert a == pytest.approx(expected[0], abs=1e-5) and b == pytest.approx(expected[1], abs=1e-5)
