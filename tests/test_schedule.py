"""The schedule against the method's oracles and diffusers' own golden constants."""
import math

import pytest
import torch

from diffkd import DDIMSchedule


@pytest.fixture(scope="module")
def schedule():
    return DDIMSchedule()


@pytest.mark.parametrize("nfe, expected", [
    (1, [0]),
    (3, [332, 166, 0]),
    (5, [400, 300, 200, 100, 0]),
    (10, [450, 400, 350, 300, 250, 200, 150, 100, 50, 0]),
    (20, list(range(475, -1, -25))),
])
def test_official_timesteps(schedule, nfe, expected):
    assert schedule.timesteps(nfe).tolist() == expected
    assert schedule.timesteps(nfe).dtype == torch.long


def test_official_steps_go_to_t_minus_ratio(schedule):
    assert schedule.step_pairs(3) == [(332, 166), (166, 0), (0, -166)]


@pytest.mark.parametrize("nfe, expected_t, expected_prev", [
    (5, [500, 400, 300, 200, 100], [400, 300, 200, 100, 0]),
    (3, [500, 334, 168], [334, 168, 0]),
    (1, [500], [0]),
])
def test_paper_timesteps(schedule, nfe, expected_t, expected_prev):
    assert schedule.timesteps(nfe, start="paper").tolist() == expected_t
    assert [p for _, p in schedule.step_pairs(nfe, start="paper")] == expected_prev


def test_alphas_cumprod_values(schedule):
    table = schedule.alphas_cumprod
    assert table.dtype == torch.float32 and table.shape == (1000,)
    for t, value in [(0, 0.999900), (100, 0.895141), (200, 0.656347), (300, 0.394011), (400, 0.193572),
                     (500, 0.077797), (999, 0.000040)]:
        assert table[t].item() == pytest.approx(value, abs=1e-6), t


def test_nfe5_step_coefficients_oracle(schedule):
    a, b = schedule.step_coefficients(5)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert a.tolist() == pytest.approx([1.42670, 1.29066, 1.16783, 1.05690, 1.00005], abs=1e-5)
    assert b.tolist() == pytest.approx([-0.50274, -0.41850, -0.36078, -0.33224, -0.01000], abs=1e-5)
    assert a.double().prod().item() == pytest.approx(2.2729, abs=1e-4)
    assert a.double().prod().item() == pytest.approx(1 / math.sqrt(schedule.alphas_cumprod[400].item()), rel=1e-6)


@pytest.mark.parametrize("start", ["official", "paper"])
@pytest.mark.parametrize("nfe", [1, 3, 5, 10])
def test_affine_step_equals_ddim_step(schedule, nfe, start):
    """x ← A·x + B·ε̂ is the deterministic DDIM update written through x̂0."""
    a, b = schedule.step_coefficients(nfe, start)
    x, eps = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    for k, (t, t_prev) in enumerate(schedule.step_pairs(nfe, start)):
        ab_t = schedule.alphas_cumprod[t].double()
        ab_prev = schedule.alphas_cumprod[t_prev].double() if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        expected = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        torch.testing.assert_close(a[k].double() * x + b[k].double() * eps, expected, rtol=1e-6, atol=1e-6)


def _diffusers_full_loop(schedule, **step_kwargs):
    n = 4 * 3 * 8 * 8
    sample = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    for t in schedule.inference_timesteps(10):
        sample = schedule.step(sample * t / (t + 1), t, sample, 10, clip_sample=True, **step_kwargs)
    return sample


def test_diffusers_golden_epsilon(schedule):
    sample = _diffusers_full_loop(schedule)
    assert sample.abs().sum().item() == pytest.approx(172.0067, abs=1e-2)
    assert sample.abs().mean().item() == pytest.approx(0.223967, abs=1e-3)


def test_diffusers_golden_v_prediction(schedule):
    sample = _diffusers_full_loop(schedule, prediction_type="v_prediction")
    assert sample.abs().sum().item() == pytest.approx(52.5302, abs=1e-2)
    assert sample.abs().mean().item() == pytest.approx(0.0684, abs=1e-3)


def test_spacings_and_t_prev_rule(schedule):
    assert schedule.inference_timesteps(10, "leading").tolist() == list(range(900, -1, -100))
    assert schedule.inference_timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert schedule.inference_timesteps(10, "linspace").tolist()[:3] == [999, 888, 777]
    # diffusers steps t → t − T//K whatever the spacing: 999 goes to 899, not 888.
    x, eps = torch.randn(8), torch.randn(8)
    ab = schedule.alphas_cumprod
    x0 = (x - (1 - ab[999]).sqrt() * eps) / ab[999].sqrt()
    expected = ab[899].sqrt() * x0 + (1 - ab[899]).sqrt() * eps
    torch.testing.assert_close(schedule.step(eps, 999, x, 10, spacing="linspace"), expected)


def test_eta_adds_scaled_noise(schedule):
    x, eps, noise = torch.randn(16), torch.randn(16), torch.randn(16)
    ab_t, ab_prev = schedule.alphas_cumprod[500], schedule.alphas_cumprod[400]
    sigma = ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    expected = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).sqrt() * eps + sigma * noise
    torch.testing.assert_close(schedule.step(eps, 500, x, 10, eta=1.0, noise=noise), expected)


def test_matches_diffusers_when_installed():
    diffusers = pytest.importorskip("diffusers")
    for beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
        ours = DDIMSchedule(beta_schedule=beta_schedule)
        assert torch.equal(theirs.alphas_cumprod, ours.alphas_cumprod), beta_schedule


@pytest.mark.parametrize("bad", [0, 501, 2.5, True])
def test_inference_steps_out_of_range(schedule, bad):
    with pytest.raises(ValueError, match=r"inference_steps must be an integer in 1\.\.500"):
        schedule.step_coefficients(bad)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        DDIMSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="unknown timestep_start 'late'"):
        DDIMSchedule().timesteps(5, start="late")
