"""Plots of training runs and comparisons (PNG, matplotlib's Agg backend: no display needed).

``plot_history(history, folder, title=...)`` draws from the rows of ``summary.csv`` (one dict per epoch):
``losses.png`` (every training loss term), ``accuracy.png`` (train / test top-1 and top-5) and, for DiffKD runs,
``gamma.png`` (each head's mean noise-adapter weight γ; γ = 1 would mean no added noise) and ``noise.png``: per
head, γ's mean with its spread over the batch, the student's relative error to the teacher before and after
denoising, and the diffusion loss.  If γ sits at 1 and the two errors coincide, the head adds no noise and the
chain does no denoising — that is visible there.

``plot_demo_comparison(results, path, title=...)`` draws test top-1 per seed for several methods (the demo's
"alone" against "with DiffKD").  Every figure carries its title on the image and in the PNG's ``Title`` field.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

NOISE_TERMS = ("gamma", "gamma_std", "rel_error_before", "rel_error_after", "diffusion_loss")


def _number(value) -> float | None:
    """A history value as a float: rows read back from summary.csv hold strings, and '' where a column is empty."""
    if value is None or value == "":
        return None
    return float(value)


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    rows = [row for row in history if _number(row.get(key)) is not None]
    return [_number(row["epoch"]) for row in rows], [_number(row[key]) for row in rows]


def _curve(axis, x: Sequence[float], y: Sequence[float], label: str, spread: Sequence[float] | None = None) -> None:
    """A line with markers (large ones when there are only a few points, so a single point shows), and a band
    of ± ``spread`` (error bars when there is a single point, where a band has no width)."""
    line, = axis.plot(x, y, marker="o" if len(x) < 30 else None, markersize=6 if len(x) <= 2 else 3, label=label)
    if spread is None:
        return
    low = [v - s for v, s in zip(y, spread)]
    high = [v + s for v, s in zip(y, spread)]
    if len(x) > 1:
        axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    else:
        axis.errorbar(x, y, yerr=list(spread), color=line.get_color(), capsize=4, linestyle="none")


def _epoch_axis(axis, ylabel: str, log_scale: bool = False) -> None:
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = {x for line in axis.get_lines() if not line.get_label().startswith("_") for x in line.get_xdata()}
    if len(epochs) == 1:  # one epoch: matplotlib would zoom to ±5% of it, with fractional ticks
        axis.set_xlim(min(epochs) - 1, min(epochs) + 1)
    axis.set_ylabel(ylabel)
    values = [v for line in axis.get_lines() for v in line.get_ydata()]
    if log_scale and values and all(v > 0 for v in values):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def _save(figure, path: Path, title: str) -> Path:
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, metadata={"Title": title})
    plt.close(figure)
    return path


def _draw(history, keys: Sequence[str], path: Path, *, ylabel: str, title: str, log_scale: bool = False) -> Path:
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for key in keys:
        _curve(axis, *_series(history, key), label=key)
    _epoch_axis(axis, ylabel, log_scale)
    return _save(figure, path, title)


def _noise_heads(keys: Sequence[str]) -> list[str]:
    """The DiffKD heads of a history: those that log γ (``train_<head>/gamma``)."""
    return [key[len("train_"):-len("/gamma")] for key in keys if key.startswith("train_") and key.endswith("/gamma")]


def _draw_noise(history, heads: Sequence[str], path: Path, title: str) -> Path:
    figure, axes = plt.subplots(len(heads), 3, figsize=(12.0, 3.2 * len(heads)), dpi=100, squeeze=False)
    for row, head in zip(axes, heads):
        def series(term):
            return _series(history, f"train_{head}/{term}")

        epochs, gamma = series("gamma")
        spread_epochs, spread = series("gamma_std")
        _curve(row[0], epochs, gamma, "mean γ ± spread over the batch" if spread_epochs == epochs else "mean γ",
               spread if spread_epochs == epochs else None)
        row[0].axhline(1.0, color="grey", linestyle=":", linewidth=1)  # γ = 1: no noise added
        _epoch_axis(row[0], f"{head} head: γ")
        for term, label in (("rel_error_before", "before denoising"), ("rel_error_after", "after denoising")):
            if series(term)[0]:
                _curve(row[1], *series(term), label=label)
        _epoch_axis(row[1], "‖Z − Z_t‖² / ‖Z_t‖²", log_scale=True)
        if series("diffusion_loss")[0]:
            _curve(row[2], *series("diffusion_loss"), label="diffusion loss")
        _epoch_axis(row[2], "diffusion loss", log_scale=True)
    return _save(figure, path, title)


def default_title(folder: str | Path) -> str:
    """The run's folder name (``<dataset>-<method>-<models>-seed<seed>``), for plots written into its
    ``plots/`` folder."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "plots" else folder.name


def plot_history(history: Sequence[Mapping[str, float]], folder: str | Path, title: str | None = None) -> list[Path]:
    """Writes the run's plots into ``folder`` (created if needed); returns the files written.

    ``title`` names the run on every figure (say: run, method, seed); by default the run folder's name.
    """
    if not history:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = title or default_title(folder)
    keys = list(dict.fromkeys(key for row in history for key in row))
    # A term that is zero throughout (a head's AE loss without an autoencoder) is left out.
    loss_keys = [k for k in keys if k.startswith("train_") and k.endswith("loss") and any(_series(history, k)[1])]
    accuracy_keys = [k for k in ("train_top1", "val_top1", "val_top5") if k in keys]
    heads = _noise_heads(keys)
    written = [_draw(history, loss_keys, folder / "losses.png", ylabel="loss (epoch mean)", title=title,
                     log_scale=True),
               _draw(history, accuracy_keys, folder / "accuracy.png", ylabel="accuracy (%)", title=title)]
    if heads:
        written.append(_draw(history, [f"train_{head}/gamma" for head in heads], folder / "gamma.png",
                             ylabel="mean γ (epoch mean)", title=title))
        written.append(_draw_noise(history, heads, folder / "noise.png", title))
    return written


def _per_seed(results: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, dict[int, float]]:
    if not results:
        raise ValueError("no results to plot: pass a mapping of method -> [(seed, value), ...]")
    table = {}
    for method, pairs in results.items():
        pairs = list(pairs)
        if not pairs:
            raise ValueError(f"method {method!r} has no results; pass at least one (seed, value) pair")
        seeds = [seed for seed, _ in pairs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"method {method!r} lists a seed twice: {seeds}")
        table[method] = {int(seed): float(value) for seed, value in pairs}
    return table


def draw_seed_comparison(axis, results: Mapping[str, Sequence[tuple[int, float]]], *,
                         ylabel: str = "test top-1 (%)") -> None:
    """Per method: each seed's value (a point, labelled with its seed; the same seed joined across methods, since
    seeds are paired) and the mean ± standard deviation over seeds (a bar and an error bar)."""
    table = _per_seed(results)
    methods = list(table)
    for position, method in enumerate(methods):
        values = list(table[method].values())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        axis.errorbar([position], [statistics.mean(values)], yerr=[spread], fmt="_", markersize=28,
                      capsize=8, color="black", zorder=3, label="mean ± std" if position == 0 else None)
    seeds = sorted({seed for by_seed in table.values() for seed in by_seed})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, seed in enumerate(seeds):
        points = [(position, table[m][seed]) for position, m in enumerate(methods) if seed in table[m]]
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o", markersize=6, linewidth=0.8, alpha=0.8, color=colors[index % len(colors)],
                  label=f"seed {seed}")
    axis.set_xticks(range(len(methods)), methods, rotation=30 if len(methods) > 4 else 0,
                    ha="right" if len(methods) > 4 else "center")
    axis.set_xlim(-0.5, len(methods) - 0.5)
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    if len(seeds) <= 10:
        axis.legend(fontsize="small", ncol=math.ceil(len(seeds) / 5))


def plot_demo_comparison(results: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *, title: str,
                         ylabel: str = "test top-1 (%)") -> Path:
    """One chart of test top-1 per seed for each method, e.g. ``{"alone": [(0, 73.1), (1, 73.2)],
    "with DiffKD": [(0, 75.0), (1, 73.8)]}``: the seeds' points, joined per seed, and mean ± std."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(max(4.0, 1.6 * len(results) + 2.0), 4.0), dpi=100)
    draw_seed_comparison(axis, results, ylabel=ylabel)
    return _save(figure, path, title)


def plot_nfe_diagnosis(diagnoses: Mapping[str, Mapping], path: str | Path, *, title: str) -> Path:
    """The NFE diagnosis of ``diffkd.diagnose`` (per head, its fields as a dict): the relative error and the KD
    distance against the number of denoising steps, and the relative error along the trained chain."""
    path = Path(path)
    figure, axes = plt.subplots(len(diagnoses), 3, figsize=(12.0, 3.4 * len(diagnoses)), dpi=100, squeeze=False)
    for row, (head, diagnosis) in zip(axes, diagnoses.items()):
        nfes = [r["nfe"] for r in diagnosis["nfe"]]
        for axis, key, label in ((row[0], "rel_error", "‖Ẑ − Z_t‖² / ‖Z_t‖²"),
                                 (row[1], "kd_distance", f"KD distance ({diagnosis['distance']})")):
            _curve(axis, nfes, [r[key] for r in diagnosis["nfe"]], label="denoised")
            axis.axvline(diagnosis["trained_nfe"], color="grey", linestyle=":", linewidth=1,
                         label=f"trained NFE {diagnosis['trained_nfe']}")
            axis.set_xscale("log")
            axis.set_xticks(nfes, [str(n) for n in nfes])
            axis.set_xlabel("denoising steps (NFE)")
            axis.set_ylabel(f"{head} head: {label}")
        row[0].axhline(diagnosis["rel_error_before"], color="tab:red", linestyle="--", linewidth=1,
                       label="before denoising")
        steps = diagnosis["steps"]
        _curve(row[2], [s["step"] for s in steps], [s["rel_error"] for s in steps], label="state x_k, through proj")
        clean = [s for s in steps if s["clean_rel_error"] is not None]
        _curve(row[2], [s["step"] for s in clean], [s["clean_rel_error"] for s in clean],
               label="clean estimate x̂_0, through proj")
        levels = ["end" if s["t"] < 0 else f"t={s['t']}" for s in steps]  # t < 0: after the last step
        row[2].set_xticks([s["step"] for s in steps], [f"{s['step']}\n{level}" for s, level in zip(steps, levels)])
        row[2].set_xlabel("chain step")
        row[2].set_ylabel("‖· − Z_t‖² / ‖Z_t‖²")
        row[2].set_yscale("log")
        for axis in row:
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
    return _save(figure, path, title)
