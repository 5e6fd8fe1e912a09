"""Distillation losses as plain functions: KL-KD, DIST, MSE, and the cosine and Pearson distances of features.

Inputs are B×K logits or B×C×H×W maps; a map is treated as B·H·W rows of C classes (softmax over channels,
as for a segmentation score map).  Every loss is computed in at least float32, so it stays finite under autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rows(x: torch.Tensor) -> torch.Tensor:
    """B×K stays; B×C×H×W becomes (B·H·W)×C."""
    if x.dim() == 2:
        return _at_least_fp32(x)
    if x.dim() == 4:
        return _at_least_fp32(x).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    raise ValueError(f"expected B×K logits or a B×C×H×W map, got a tensor of shape {tuple(x.shape)}")


def _check_pair(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student and teacher shapes differ: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def kl_div_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """τ²·KL(softmax(T/τ) ‖ softmax(S/τ)), summed over classes and averaged over rows (``batchmean``)."""
    _check_pair("kl_div_loss", student_logits, teacher_logits)
    _check_temperature(temperature)
    log_p_s = F.log_softmax(_rows(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(_rows(teacher_logits) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al. 2022): β·inter-class + γ·intra-class (1 − Pearson) losses on softmax probabilities, ×τ²."""
    _check_pair("dist_loss", student_logits, teacher_logits)
    _check_temperature(temperature)
    p_s = (_rows(student_logits) / temperature).softmax(dim=1)
    p_t = (_rows(teacher_logits) / temperature).softmax(dim=1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element, in float32."""
    _check_pair("mse_loss", student, teacher)
    return F.mse_loss(_at_least_fp32(student), _at_least_fp32(teacher))


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """1 − cosine similarity of each row (a B×K vector, or a map's channel vector at each position), averaged.

    Scale-free: it compares the directions of the features, not their magnitudes.  ``temperature`` is accepted so
    that every entry of DISTANCES takes the same arguments, and is not used."""
    _check_pair("cosine_distance", student, teacher)
    return 1 - F.cosine_similarity(_rows(student), _rows(teacher), dim=1, eps=1e-8).mean()


def pearson_distance(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """1 − Pearson correlation of each row (over its channels), averaged: the cosine distance of the rows after
    removing each row's mean, so invariant to a per-row shift and scale.  ``temperature`` is not used."""
    _check_pair("pearson_distance", student, teacher)
    return 1 - _pearson_rows(_rows(student), _rows(teacher)).mean()


DISTANCES = {"mse": mse_loss, "kl": kl_div_loss, "dist": dist_loss, "cosine": cosine_distance,
             "pearson": pearson_distance}
FEATURE_DISTANCES = ("mse", "cosine", "pearson")  # the ones that compare feature maps (kl and dist compare classes)
