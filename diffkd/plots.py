"""Per-epoch plots of a training run (PNG, matplotlib's Agg backend: no display needed).

``plot_history(history, folder)`` draws from the rows of ``summary.csv`` (one dict per epoch):
``losses.png`` (every training loss term), ``accuracy.png`` (train / validation top-1 and top-5) and, for DiffKD
runs, ``gamma.png`` (each head's mean noise-adapter weight γ; γ = 1 would mean no added noise).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    rows = [row for row in history if row.get(key) is not None]
    return [row["epoch"] for row in rows], [float(row[key]) for row in rows]


def _draw(history, keys: Sequence[str], path: Path, *, ylabel: str, log_scale: bool = False) -> Path:
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for key in keys:
        epochs, values = _series(history, key)
        axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=key)
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(ylabel)
    if log_scale and all(v > 0 for key in keys for v in _series(history, key)[1]):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_history(history: Sequence[Mapping[str, float]], folder: str | Path) -> list[Path]:
    """Writes the run's plots into ``folder`` (created if needed); returns the files written."""
    if not history:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for row in history for key in row))
    # A term that is zero throughout (a head's AE loss without an autoencoder) is left out.
    loss_keys = [k for k in keys if k.startswith("train_") and k.endswith("loss") and any(_series(history, k)[1])]
    accuracy_keys = [k for k in ("train_top1", "val_top1", "val_top5") if k in keys]
    gamma_keys = [k for k in keys if k.endswith("/gamma")]
    written = [_draw(history, loss_keys, folder / "losses.png", ylabel="loss (epoch mean)", log_scale=True),
               _draw(history, accuracy_keys, folder / "accuracy.png", ylabel="accuracy (%)")]
    if gamma_keys:
        written.append(_draw(history, gamma_keys, folder / "gamma.png", ylabel="mean γ (epoch mean)"))
    return written
