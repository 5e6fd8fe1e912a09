"""KL-KD, DIST and MSE against values computed by hand from their equations."""
import math

import pytest
import torch

from diffkd import dist_loss, kl_div_loss, mse_loss

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]]


def _softmax(row, tau):
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def _kl_by_hand(student, teacher, tau):
    total = 0.0
    for s, t in zip(student, teacher):
        p_s, p_t = _softmax(s, tau), _softmax(t, tau)
        total += sum(pt * math.log(pt / ps) for ps, pt in zip(p_s, p_t))
    return tau ** 2 * total / len(student)


def _pearson(a, b, eps=1e-8):
    """As the official DIST: the norms' product gets eps added."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)) + eps)


def _dist_by_hand(student, teacher, tau, beta, gamma):
    p_s = [_softmax(r, tau) for r in student]
    p_t = [_softmax(r, tau) for r in teacher]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    cols_s, cols_t = list(zip(*p_s)), list(zip(*p_t))
    intra = 1 - sum(_pearson(a, b) for a, b in zip(cols_s, cols_t)) / len(cols_s)
    return tau ** 2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kl_by_hand(tau):
    value = kl_div_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64),
                        temperature=tau)
    assert value.item() == pytest.approx(_kl_by_hand(STUDENT, TEACHER, tau), rel=1e-9)


def test_kl_zero_for_equal_logits_and_gradient_to_student_only():
    s = torch.randn(4, 10, requires_grad=True)
    assert kl_div_loss(s, s.detach()).item() == pytest.approx(0.0, abs=1e-6)
    kl_div_loss(s, torch.randn(4, 10)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("tau, beta, gamma", [(1.0, 1.0, 1.0), (4.0, 1.0, 2.0)])
def test_dist_by_hand(tau, beta, gamma):
    value = dist_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64), beta=beta, gamma=gamma, temperature=tau)
    assert value.item() == pytest.approx(_dist_by_hand(STUDENT, TEACHER, tau, beta, gamma), rel=1e-9)


def test_maps_are_rows_of_channels():
    s, t = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    assert kl_div_loss(s, t).item() == pytest.approx(kl_div_loss(rows(s), rows(t)).item(), rel=1e-6)
    assert dist_loss(s, t).item() == pytest.approx(dist_loss(rows(s), rows(t)).item(), rel=1e-6)


def test_mse_by_hand():
    assert mse_loss(torch.tensor(STUDENT), torch.tensor(TEACHER)).item() == pytest.approx(
        sum((a - b) ** 2 for r, q in zip(STUDENT, TEACHER) for a, b in zip(r, q)) / 6, rel=1e-6)


def test_losses_are_float32_for_half_inputs():
    s, t = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16()
    for fn in (kl_div_loss, dist_loss, mse_loss):
        assert fn(s, t).dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"shapes differ: \(2, 3\) vs \(2, 4\)"):
        kl_div_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dist_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0)
    with pytest.raises(ValueError, match="expected B×K logits or a B×C×H×W map"):
        kl_div_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
