"""The noise-gap estimates recover known noise on synthetic features, and run on a trained DiffKD checkpoint."""
import math

import pytest
import torch

from diffkd.noise_gap import Moments, features_gap, format_table, linear_cka, measure_models, ridge_map

# With 40,000 samples of 16 dimensions the estimates' sampling error is well under 5%.
SAMPLES, DIM, TOLERANCE = 40_000, 16, 0.05


def _batches(*tensors, size=5000):
    return [tuple(t[i:i + size] for t in tensors) for i in range(0, tensors[0].shape[0], size)]


def _noisy_pair(sigma, seed, mixing=None):
    generator = torch.Generator().manual_seed(seed)
    z_t = torch.randn(SAMPLES, DIM, generator=generator, dtype=torch.float64)
    clean = z_t if mixing is None else z_t @ mixing
    return clean + sigma * torch.randn(clean.shape, generator=generator, dtype=torch.float64), z_t, clean


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_white_noise_is_recovered_in_both_directions(sigma):
    z_s, z_t, _ = _noisy_pair(sigma, seed=0)
    fit, test = _batches(z_s[:SAMPLES // 2], z_t[:SAMPLES // 2]), _batches(z_s[SAMPLES // 2:], z_t[SAMPLES // 2:])
    gap = features_gap(fit, test)
    # Z_s = Z_t + σN, both white: either read-out has SNR 1/σ² and leaves σ²/(1+σ²) of the variance; CKA 1/(1+σ²).
    for direction in (gap.student_to_teacher, gap.teacher_to_student):
        assert direction.noise_to_signal == pytest.approx(sigma ** 2, rel=TOLERANCE)
        assert direction.one_minus_r2 == pytest.approx(sigma ** 2 / (1 + sigma ** 2), rel=TOLERANCE)
    assert gap.cka == pytest.approx(1 / (1 + sigma ** 2), rel=TOLERANCE)
    assert gap.fit_samples == gap.test_samples == SAMPLES // 2


def test_teacher_to_student_recovers_the_noise_energy_through_a_linear_map():
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(DIM, 24, generator=generator, dtype=torch.float64) / math.sqrt(DIM)  # 16 → 24 channels
    sigma = 0.5
    z_s, z_t, clean = _noisy_pair(sigma, seed=2, mixing=mixing)
    half = SAMPLES // 2
    gap = features_gap(_batches(z_s[:half], z_t[:half]), _batches(z_s[half:], z_t[half:]))
    expected_snr = float((clean[half:] - clean[half:].mean(0)).pow(2).sum()) / (half * 24 * sigma ** 2)
    assert gap.teacher_to_student.snr == pytest.approx(expected_snr, rel=TOLERANCE)


def test_feature_maps_are_sampled_per_position_and_a_scaled_copy_has_no_gap():
    generator = torch.Generator().manual_seed(3)
    z_t = torch.randn(64, 8, 5, 5, generator=generator)
    gap = features_gap([(3 * z_t[:32], z_t[:32])], [(3 * z_t[32:], z_t[32:])])
    assert gap.fit_samples == 32 * 25
    assert gap.student_to_teacher.one_minus_r2 < 1e-3 and gap.cka == pytest.approx(1.0, abs=1e-6)


def test_unpaired_features_and_empty_fits_are_refused():
    with pytest.raises(ValueError, match="paired"):
        Moments().add(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ridge_map(Moments())
    moments = Moments()
    moments.add(torch.randn(10, 3), torch.randn(10, 2))
    assert 0 <= linear_cka(moments) <= 1


def test_a_trained_diffkd_pair_is_measured_at_every_point():
    from diffkd.methods import build_heads, method_settings
    from diffkd.models import create_model

    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10, in_chans=1)
    teacher = create_model("resnet14", num_classes=10, in_chans=1)
    settings = method_settings("diffkd", "fashion-mnist", nfe=2)
    heads = build_heads(settings, {"feature": (64, 7, 7), "logit": (10,)}, {"feature": (64, 7, 7), "logit": (10,)})
    images = [(torch.randn(8, 1, 28, 28),) for _ in range(2)]
    gaps = measure_models(student, teacher, images, images, feature_taps=("layer3", "layer3"), heads=heads)
    assert set(gaps) == {"feature/raw", "logit/raw", "feature/projection", "feature/denoised", "logit/projection",
                         "logit/denoised"}
    assert gaps["feature/raw"].fit_samples == 16 * 49 and gaps["logit/raw"].fit_samples == 16
    assert all(0 <= g.student_to_teacher.one_minus_r2 for g in gaps.values())
    assert "feature/denoised" in format_table(gaps)


def test_a_run_without_teacher_is_measured_against_a_named_one(tmp_path):
    from diffkd.models import create_model
    from diffkd.noise_gap import checkpoint_report, measure_checkpoint

    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10, in_chans=1)
    teacher_file = tmp_path / "teacher.pth"
    torch.save({"model": create_model("resnet14", num_classes=10, in_chans=1).state_dict()}, teacher_file)
    checkpoint = {"args": {"method": "none", "student": "resnet8", "dataset": "fashion-mnist"},
                  "student": student.state_dict()}
    info = {"num_classes": 10, "in_chans": 1, "image_size": 28}
    images = [(torch.randn(8, 1, 28, 28),)]
    with pytest.raises(ValueError, match="has no teacher"):
        measure_checkpoint(checkpoint, images, images, info)
    gaps = measure_checkpoint(checkpoint, images, images, info, teacher=("resnet14", teacher_file))
    assert set(gaps) == {"feature/raw", "logit/raw"}
    with pytest.raises(ValueError, match="last.pth"):
        checkpoint_report(None, dataset="fashion-mnist", data_dir=None, task="classification")
    with pytest.raises(ValueError, match="detection"):
        checkpoint_report(checkpoint, dataset="fashion-scenes", data_dir=None, task="detection")


def test_two_runs_students_are_measured_against_each_other():
    from diffkd.models import create_model
    from diffkd.noise_gap import checkpoint_report, measure_runs

    torch.manual_seed(0)
    runs = [{"args": {"method": "none", "student": name, "dataset": "fashion-mnist"},
             "student": create_model(name, num_classes=10, in_chans=1).state_dict()}
            for name in ("resnet8", "resnet8", "resnet14")]
    info = {"num_classes": 10, "in_chans": 1, "image_size": 28}
    images = [(torch.randn(16, 1, 28, 28),) for _ in range(2)]
    itself = measure_runs(runs[0], runs[0], images, images, info)
    assert set(itself) == {"feature/raw", "logit/raw"}
    assert itself["feature/raw"].student_to_teacher.one_minus_r2 < 1e-4  # no more than the ridge penalty's shrinkage
    assert itself["feature/raw"].cka == pytest.approx(1.0)
    other_seed = measure_runs(runs[0], runs[1], images, images, info)
    assert other_seed["feature/raw"].student_to_teacher.one_minus_r2 > 1e-3
    assert measure_runs(runs[0], runs[2], images, images, info)["feature/raw"].fit_samples == 32 * 49
    with pytest.raises(ValueError, match="trained on cifar100, this one is tested on fashion-mnist"):
        checkpoint_report(runs[0], dataset="fashion-mnist", data_dir=None, task="classification",
                          against={**runs[1], "args": {**runs[1]["args"], "dataset": "cifar100"}})
