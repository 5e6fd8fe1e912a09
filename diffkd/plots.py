"""Plots of training runs and comparisons (PNG, matplotlib's Agg backend: no display needed).

``plot_history(history, folder, title=...)`` draws from the rows of ``summary.csv`` (one dict per epoch):
``losses.png`` (every training loss term, named in words, each series its own colour and line style),
``accuracy.png`` (one panel per metric: top-1 and top-5, box mAP and mAP@.5, or mIoU and pixel accuracy) and, for
DiffKD runs, ``gamma.png`` (each head's mean noise-adapter weight γ; γ = 1 would mean no added noise) and
``noise.png``: per head, γ's mean with its spread over the batch (clipped to γ's range [0, 1]), the student's
relative squared error to the teacher before and after denoising, and the diffusion loss.  If γ sits at 1 and the
two errors coincide, the head adds no noise and the chain does no denoising — that is visible there.

``plot_demo_comparison(results, path, title=...)`` draws each seed's test value for several methods on an axis from
0, and the paired difference with its 95% CI.  Legends sit outside the axes; every figure carries its title on the
image and in the PNG's ``Title`` field.
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
# Enough distinct (colour, line style) pairs for 20 series and more: ten colours, then the next style.
_COLOURS = plt.get_cmap("tab10").colors
_LINE_STYLES = ("-", "--", ":", "-.")
# Words for the parts of summary.csv's column names.
_TERM_WORDS = {"ce": "cross-entropy", "kd": "KD", "ae": "autoencoder", "dist": "DIST", "mse": "MSE",
               "fpn": "FPN", "bbox": "box", "rpn": "RPN"}
# The test metrics of every task (summary.csv's val_<key>, and train_<key> where training measures it), one panel
# each in accuracy.png.
METRIC_PANELS = {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)", "map": "box mAP@[.5:.95] (%)",
                 "map50": "box mAP@.5 (%)", "miou": "mean IoU over classes (%)", "pixel_accuracy": "pixel accuracy (%)"}
_METRIC_SOURCES = {"train": "training batches (augmented)", "val": "test set"}
# What a DiffKD head distils, for axis labels.
_HEAD_TENSORS = {"feature": "feature map", "logit": "logits"}


def _number(value) -> float | None:
    """A history value as a float: rows read back from summary.csv hold strings, and '' where a column is empty."""
    if value is None or value == "":
        return None
    return float(value)


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    rows = [row for row in history if _number(row.get(key)) is not None]
    return [_number(row["epoch"]) for row in rows], [_number(row[key]) for row in rows]


def series_name(key: str) -> str:
    """A summary.csv column in words: ``train_feature/diffusion_loss`` -> ``feature head: diffusion loss``,
    ``train_ce_loss`` -> ``cross-entropy loss``, ``train_loss`` -> ``total loss``."""
    name = key[len("train_"):] if key.startswith("train_") else key
    head, _, term = name.rpartition("/")
    words = " ".join(_TERM_WORDS.get(word, word) for word in term.split("_"))
    words = "total loss" if words == "loss" else words
    return f"{head} head: {words}" if head else words


def _style(index: int) -> dict:
    return dict(color=_COLOURS[index % len(_COLOURS)], linestyle=_LINE_STYLES[index // len(_COLOURS) %
                                                                              len(_LINE_STYLES)])


def _curve(axis, x: Sequence[float], y: Sequence[float], label: str, spread: Sequence[float] | None = None, *,
           limits: tuple[float, float] | None = None, annotate: bool = False, **style) -> None:
    """A line with markers (large ones when there are only a few points, so a lone point shows), a band of
    ± ``spread`` clipped to the quantity's ``limits`` (error bars when there is a single point), and with
    ``annotate`` the value written above each point when there are one or two."""
    line, = axis.plot(x, y, marker="o" if len(x) < 30 else None, markersize=7 if len(x) <= 2 else 3, label=label,
                      **style)
    if annotate and len(x) <= 2:
        for xv, yv in zip(x, y):
            axis.annotate(f"{yv:.2f}", (xv, yv), textcoords="offset points", xytext=(0, 7), ha="center",
                          fontsize="small", color=line.get_color())
        axis.margins(x=0.12, y=0.15)  # room for the numbers at the ends
    if spread is None:
        return
    low, high = limits or (-math.inf, math.inf)
    lower = [min(max(v - s, low), high) for v, s in zip(y, spread)]
    upper = [min(max(v + s, low), high) for v, s in zip(y, spread)]
    if len(x) > 1:
        axis.fill_between(x, lower, upper, color=line.get_color(), alpha=0.2, linewidth=0)
    else:
        axis.errorbar(x, y, yerr=[[v - lo for v, lo in zip(y, lower)], [hi - v for v, hi in zip(y, upper)]],
                      color=line.get_color(), capsize=4, linestyle="none")


def _legend_outside(axis, below: bool = False) -> None:
    """The legend to the right of the axes (``below``: under them, for panels side by side), where it hides no
    data."""
    if not axis.get_legend_handles_labels()[0]:
        return
    if below:
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0.0, fontsize="small")
    else:
        axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")


def _epoch_axis(axis, ylabel: str, log_scale: bool = False, legend_below: bool = False) -> None:
    """Epochs on x (whole numbers), ``ylabel`` on y, a log scale when asked for and the values span more than a
    factor of 10 (over less, log ticks only clutter), a grid and the legend outside."""
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Data lines only: reference lines (axhline) span the axes in axes coordinates.
    epochs = {x for line in axis.get_lines() if line.get_transform() is axis.transData for x in line.get_xdata()}
    if len(epochs) == 1:  # one epoch: matplotlib would zoom to ±5% of it, with fractional ticks
        axis.set_xlim(min(epochs) - 1, min(epochs) + 1)
    axis.set_ylabel(ylabel)
    values = [v for line in axis.get_lines() for v in line.get_ydata()]
    if log_scale and values and all(v > 0 for v in values) and max(values) > 10 * min(values):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    _legend_outside(axis, below=legend_below)


def _figure(rows: int, columns: int, width: float, height: float):
    """A figure whose layout keeps the title, the panels and the legends outside them apart."""
    return plt.subplots(rows, columns, figsize=(width, height), dpi=100, squeeze=False, layout="constrained")


def _save(figure, path: Path, title: str) -> Path:
    figure.suptitle(title, fontsize="medium")
    figure.savefig(path, metadata={"Title": title})
    plt.close(figure)
    return path


def _draw_losses(history, keys: Sequence[str], path: Path, title: str) -> Path:
    figure, axes = _figure(1, 1, 8.4, 4.4)
    for index, key in enumerate(keys):
        _curve(axes[0][0], *_series(history, key), label=series_name(key), **_style(index))
    _epoch_axis(axes[0][0], "loss (mean over the epoch's steps)", log_scale=True)
    return _save(figure, path, title)


def _draw_metrics(history, keys: Sequence[str], path: Path, title: str) -> Path:
    """One panel per metric (top-1 and top-5, or mAP and mAP@.5, or mIoU and pixel accuracy): the test set's
    values, with their numbers when evaluated only a few times, and the training batches' where measured."""
    panels = [metric for metric in METRIC_PANELS if any(f"{source}_{metric}" in keys for source in _METRIC_SOURCES)]
    figure, axes = _figure(max(len(panels), 1), 1, 8.0, 2.9 * max(len(panels), 1) + 0.4)
    for (axis,), metric in zip(axes, panels):
        for index, source in enumerate(_METRIC_SOURCES):
            if f"{source}_{metric}" in keys:
                epochs, values = _series(history, f"{source}_{metric}")
                label = _METRIC_SOURCES[source] + (f" (evaluated at epoch{'s' if len(epochs) > 1 else ''} "
                                                   f"{', '.join(f'{e:g}' for e in epochs)})"
                                                   if source == "val" and len(epochs) <= 2 else "")
                _curve(axis, epochs, values, label=label, annotate=source == "val", **_style(index))
        _epoch_axis(axis, METRIC_PANELS[metric])
    run_epochs = [_number(row["epoch"]) for row in history]
    low, high = min(run_epochs), max(run_epochs)
    for (axis,) in axes:  # every panel spans the run's epochs, however few of them were evaluated
        axis.set_xlim(*((low - 1, high + 1) if low == high else (low - 0.05 * (high - low) - 0.3,
                                                                   high + 0.05 * (high - low) + 0.3)))
    return _save(figure, path, title)


def _noise_heads(keys: Sequence[str]) -> list[str]:
    """The DiffKD heads of a history: those that log γ (``train_<head>/gamma``)."""
    return [key[len("train_"):-len("/gamma")] for key in keys if key.startswith("train_") and key.endswith("/gamma")]


def _draw_gamma(history, heads: Sequence[str], path: Path, title: str) -> Path:
    figure, axes = _figure(1, 1, 8.0, 4.0)
    for index, head in enumerate(heads):
        _curve(axes[0][0], *_series(history, f"train_{head}/gamma"), label=f"{head} head", **_style(index))
    axes[0][0].set_ylim(0.0, 1.05)  # γ is a weight in [0, 1]
    _epoch_axis(axes[0][0], "noise-adapter weight γ\n(epoch mean; 1 = no noise added)")
    return _save(figure, path, title)


def _draw_noise(history, heads: Sequence[str], path: Path, title: str) -> Path:
    figure, axes = _figure(len(heads), 3, 15.0, 3.4 * len(heads) + 0.5)
    for row, head in zip(axes, heads):
        def series(term):
            return _series(history, f"train_{head}/{term}")

        epochs, gamma = series("gamma")
        spread_epochs, spread = series("gamma_std")
        with_spread = spread_epochs == epochs
        _curve(row[0], epochs, gamma, "mean γ ± spread over the batch\n(clipped to [0, 1])" if with_spread
               else "mean γ", spread if with_spread else None, limits=(0.0, 1.0))
        row[0].axhline(1.0, color="grey", linestyle=":", linewidth=1, label="γ = 1: no noise added")
        row[0].set_ylim(0.0, 1.05)
        _epoch_axis(row[0], f"{head} head:\nnoise-adapter weight γ", legend_below=True)
        for index, (term, label) in enumerate((("rel_error_before", "student, before denoising"),
                                               ("rel_error_after", "student, after denoising"))):
            if series(term)[0]:
                _curve(row[1], *series(term), label=label, **_style(index))
        what = _HEAD_TENSORS.get(head, f"{head} map")
        _epoch_axis(row[1], f"{head} head: relative squared\nerror to the teacher's {what}",
                    log_scale=True, legend_below=True)
        if series("diffusion_loss")[0]:
            _curve(row[2], *series("diffusion_loss"), label="_diffusion loss")  # the axis label names it
        _epoch_axis(row[2], f"{head} head: diffusion loss\n(noise-prediction error)", log_scale=True)
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
    if len(loss_keys) == 2 and "train_loss" in loss_keys:  # a single term: the total is the same curve
        loss_keys.remove("train_loss")
    heads = _noise_heads(keys)
    written = [_draw_losses(history, loss_keys, folder / "losses.png", title),
               _draw_metrics(history, keys, folder / "accuracy.png", title)]
    if heads:
        written.append(_draw_gamma(history, heads, folder / "gamma.png", title))
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
                         ylabel: str = "test top-1 (%)", y_from: float | None = None) -> None:
    """Per method: each seed's value (a point; the same seed joined across methods, since seeds are paired) and
    the mean ± standard deviation over seeds (a black diamond with a bar, unlike the seeds' dots).  With
    ``y_from`` the y-axis starts there, and the label says so; without, it fits the values (pair it with a
    panel of the differences, as the benchmarks do)."""
    table = _per_seed(results)
    methods = list(table)
    for position, method in enumerate(methods):
        values = list(table[method].values())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        axis.errorbar([position + 0.18], [statistics.mean(values)], yerr=[spread], fmt="D", markersize=8,
                      markerfacecolor="white", markeredgecolor="black", markeredgewidth=1.5, elinewidth=1.5,
                      capsize=0, color="black", zorder=3, label="mean ± std over seeds" if position == 0 else None)
    seeds = sorted({seed for by_seed in table.values() for seed in by_seed})
    for index, seed in enumerate(seeds):
        points = [(position, table[m][seed]) for position, m in enumerate(methods) if seed in table[m]]
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o", markersize=6, linewidth=0.8, alpha=0.8, label=f"seed {seed}",
                  **{**_style(index), "linestyle": "-"})
    axis.set_xticks(range(len(methods)), methods, rotation=30 if len(methods) > 4 else 0,
                    ha="right" if len(methods) > 4 else "center")
    axis.set_xlim(-0.5, len(methods) - 0.5)
    if y_from is not None:
        axis.set_ylim(bottom=y_from)
        ylabel = f"{ylabel}\n(axis from {y_from:g})"
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    if len(seeds) <= 10:
        _legend_outside(axis)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, the last one (which overstates the
# interval's width by at most 4%).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _paired_difference(better: Mapping[int, float], worse: Mapping[int, float]) -> tuple[list[float], float,
                                                                                        float | None]:
    """The seed-matched differences ``better − worse``, their mean and the 95% CI's half width (None under two
    common seeds)."""
    differences = [better[seed] - worse[seed] for seed in sorted(set(better) & set(worse))]
    if not differences:
        raise ValueError("the methods share no seed, so there is no paired difference to draw")
    if len(differences) < 2:
        return differences, differences[0], None
    quantile = _T_975[min(len(differences) - 1, len(_T_975)) - 1]
    return (differences, statistics.mean(differences),
            quantile * statistics.stdev(differences) / math.sqrt(len(differences)))


def plot_demo_comparison(results: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *, title: str,
                         ylabel: str = "test top-1 (%)", teacher: tuple[str, float] | None = None) -> Path:
    """The demo's chart, e.g. for ``{"alone": [(0, 73.1), (1, 73.2)], "with DiffKD": [(0, 75.0), (1, 73.8)]}``.

    Left: each seed's value per method and the mean ± std, on an axis from 0 (so a gap is drawn at its true
    size), with the ``teacher`` (name, value) as a dashed line.  Right: the paired difference of the last method
    from the first, seed by seed, its mean and 95% confidence interval (t over the seeds), around a zero line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, ((left, right),) = _figure(1, 2, 11.5, 4.6)
    if teacher is not None:
        left.axhline(teacher[1], color="grey", linestyle="--", linewidth=1.2,
                     label=f"teacher {teacher[0]}: {teacher[1]:.2f}")
    draw_seed_comparison(left, results, ylabel=ylabel, y_from=0.0)
    table = _per_seed(results)
    first, last = list(table)[0], list(table)[-1]
    differences, mean, half_width = _paired_difference(table[last], table[first])
    seeds = sorted(set(table[first]) & set(table[last]))
    right.scatter([0.0] * len(differences), differences, color="tab:blue", zorder=3, label="per seed")
    for seed, difference in zip(seeds, differences):
        right.annotate(f"seed {seed}", (0.0, difference), textcoords="offset points", xytext=(-8, 0),
                       ha="right", va="center", fontsize="small")
    right.errorbar([0.35], [mean], yerr=None if half_width is None else [half_width], fmt="D", markersize=8,
                   markerfacecolor="white", markeredgecolor="black", color="black", capsize=6, zorder=3,
                   label="mean, 95% CI" if half_width is not None else "mean (one seed: no CI)")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xlim(-0.8, 0.9)
    right.set_xticks([])
    right.set_ylabel(f"paired difference, {last} − {first}\n({ylabel.split(' (')[0]}, points)")
    right.grid(axis="y", alpha=0.3)
    _legend_outside(right)
    return _save(figure, path, title)


def plot_nfe_diagnosis(diagnoses: Mapping[str, Mapping], path: str | Path, *, title: str) -> Path:
    """The NFE diagnosis of ``diffkd.diagnose`` (per head, its fields as a dict): the relative error and the KD
    distance against the number of denoising steps, and the relative error along the trained chain."""
    path = Path(path)
    figure, axes = _figure(len(diagnoses), 3, 16.0, 3.6 * len(diagnoses) + 0.5)
    for row, (head, diagnosis) in zip(axes, diagnoses.items()):
        nfes = [r["nfe"] for r in diagnosis["nfe"]]
        for axis, key, label in ((row[0], "rel_error", "squared error of the denoised\nmap to the teacher's, "
                                                       "relative"),
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
        row[2].set_ylabel("squared error to the teacher's\nmap, relative to its size")
        row[2].set_yscale("log")
        for axis in row:
            axis.grid(alpha=0.3)
            _legend_outside(axis)
    return _save(figure, path, title)
