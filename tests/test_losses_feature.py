"""The cosine and Pearson distances of features (the DiffKD feature head's --feature-distance)."""
import pytest
import torch

from diffkd.losses import DISTANCES, FEATURE_DISTANCES, cosine_distance, pearson_distance


def test_cosine_distance_compares_directions_per_position():
    x = torch.randn(2, 8, 3, 3)
    assert float(cosine_distance(5 * x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(-x, x)) == pytest.approx(2.0, abs=1e-6)
    a, b = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    a[0, 0], b[0, 1] = 1.0, 1.0
    assert float(cosine_distance(a, b)) == pytest.approx(1.0)  # orthogonal channel vectors
    # per position: one position identical, one opposite → mean 1
    pair = torch.tensor([[1.0, -1.0], [2.0, 3.0]])[None, :, :, None]  # 1×2×2×1: positions (1, 2) and (-1, 3)
    other = torch.stack([pair[0, :, 0, 0], -pair[0, :, 1, 0]], dim=1)[None, :, :, None]
    assert float(cosine_distance(pair, other)) == pytest.approx(1.0, abs=1e-6)


def test_pearson_distance_ignores_a_per_row_shift_and_scale():
    x = torch.randn(4, 10)
    assert float(pearson_distance(3 * x + 7, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(pearson_distance(-x, x)) == pytest.approx(2.0, abs=1e-5)
    assert float(cosine_distance(x + 7, x)) > 0.01  # cosine does see the shift


def test_feature_distances_share_the_head_signature_and_refuse_mismatched_shapes():
    assert set(FEATURE_DISTANCES) <= set(DISTANCES)
    x = torch.randn(2, 4, 2, 2, requires_grad=True)
    for name in ("cosine", "pearson"):
        loss = DISTANCES[name](x, torch.randn(2, 4, 2, 2), temperature=4.0)
        loss.backward()
        assert torch.isfinite(x.grad).all()
        with pytest.raises(ValueError, match="shapes differ"):
            DISTANCES[name](torch.zeros(2, 4), torch.zeros(2, 5))
