"""diffkd.plots: which files a history gives, their titles, single-epoch runs and the seed comparison."""
import csv

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from diffkd import plots


def _history(epochs: int, diffkd: bool) -> list[dict]:
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "lr": 0.1 / epoch, "train_loss": 2.0 / epoch, "train_ce_loss": 1.5 / epoch,
               "train_top1": 50.0 + epoch, "val_top1": 48.0 + epoch, "val_top5": 90.0}
        if diffkd:
            for head in ("feature", "logit"):
                row.update({f"train_{head}/kd_loss": 0.5 / epoch, f"train_{head}/diffusion_loss": 0.9 / epoch,
                            f"train_{head}/ae_loss": 0.0, f"train_{head}/gamma": 0.9,
                            f"train_{head}/gamma_std": 0.05, f"train_{head}/rel_error_before": 1.2,
                            f"train_{head}/rel_error_after": 0.4 / epoch})
        rows.append(row)
    return rows


@pytest.fixture
def closed_figures(monkeypatch):
    """Every figure plots.py closes (after saving it), so tests can read what was drawn."""
    figures = []
    close = plots.plt.close

    def keep(figure=None):
        figures.append(figure)
        close(figure)

    monkeypatch.setattr(plots.plt, "close", keep)
    return figures


def _png_title(path) -> str:
    with Image.open(path) as image:
        return image.text["Title"]


@pytest.mark.parametrize("diffkd", [False, True])
def test_files_written_and_every_plot_carries_the_title(diffkd, tmp_path, closed_figures):
    title = "fashion-mnist-diffkd-resnet14_resnet8-seed3"
    written = plots.plot_history(_history(3, diffkd), tmp_path / "plots", title=title)
    names = ["losses.png", "accuracy.png"] + (["gamma.png", "noise.png"] if diffkd else [])
    assert [p.name for p in written] == names
    for path in written:
        assert path.is_file() and _png_title(path) == title
    assert [figure._suptitle.get_text() for figure in closed_figures] == [title] * len(names)


def test_noise_plot_has_one_row_per_head_with_the_diagnostics(tmp_path, closed_figures):
    plots.plot_history(_history(4, True), tmp_path)
    noise = closed_figures[-1]
    assert len(noise.axes) == 6  # 2 heads × (γ, relative errors, diffusion loss)
    gamma_axis, error_axis, diffusion_axis = noise.axes[:3]
    assert "feature head" in gamma_axis.get_ylabel()
    assert list(gamma_axis.get_lines()[0].get_ydata()) == [0.9] * 4
    assert len(gamma_axis.collections) == 1  # the ± spread band
    assert [t.get_text() for t in error_axis.get_legend().get_texts()] == ["student, before denoising",
                                                                           "student, after denoising"]
    assert "relative squared error to the teacher's feature map" in error_axis.get_ylabel().replace("\n", " ")
    assert diffusion_axis.get_lines()[0].get_ydata()[-1] == pytest.approx(0.9 / 4)


def test_default_title_is_the_run_folder(tmp_path):
    written = plots.plot_history(_history(2, False), tmp_path / "mnist-none-resnet8-seed1" / "plots")
    assert _png_title(written[0]) == "mnist-none-resnet8-seed1"


def test_single_epoch_history_draws_visible_points(tmp_path, closed_figures):
    plots.plot_history(_history(1, True), tmp_path, title="one epoch")
    curves = [line for figure in closed_figures for axis in figure.axes for line in axis.get_lines()
              if line.get_transform() is axis.transData  # not the γ = 1 guide line
              and not line.get_label().startswith("_")]  # nor error-bar parts
    assert curves and all(len(line.get_xdata()) == 1 for line in curves)
    assert all(line.get_marker() == "o" and line.get_markersize() >= 6 for line in curves)
    gamma_axis = closed_figures[-1].axes[0]
    assert gamma_axis.containers  # a single point's spread is an error bar (a band would have no width)


def test_history_read_back_from_summary_csv(tmp_path):
    history = _history(2, True)
    with open(tmp_path / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(history[0]) + ["val_loss"])
        writer.writeheader()
        writer.writerows(history)  # val_loss left empty, as for epochs that were not evaluated
    with open(tmp_path / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(plots.plot_history(rows, tmp_path / "plots", title="from csv")) == 4


def test_demo_comparison_per_seed(tmp_path, closed_figures):
    results = {"alone": [(0, 73.14), (1, 73.23)], "with DiffKD": [(0, 74.95), (1, 73.84)]}
    path = plots.plot_demo_comparison(results, tmp_path / "demo" / "comparison.png", title="demo, seeds 0 and 1")
    assert path.is_file() and _png_title(path) == "demo, seeds 0 and 1"
    axis = closed_figures[-1].axes[0]
    seed_lines = {line.get_label(): list(line.get_ydata()) for line in axis.get_lines() if
                  line.get_label().startswith("seed")}
    assert seed_lines == {"seed 0": [73.14, 74.95], "seed 1": [73.23, 73.84]}
    assert [t.get_text() for t in axis.get_xticklabels()] == ["alone", "with DiffKD"]


@pytest.mark.parametrize("results, message", [({}, "no results"), ({"kd": []}, "'kd' has no results"),
                                              ({"kd": [(0, 1.0), (0, 2.0)]}, "lists a seed twice")])
def test_demo_comparison_refuses_bad_results(results, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        plots.plot_demo_comparison(results, tmp_path / "x.png", title="t")


def _overlaps(figure, legend, axis) -> bool:
    renderer = FigureCanvasAgg(figure).get_renderer()  # the figure was closed: a fresh canvas lays it out again
    return legend.get_window_extent(renderer).overlaps(axis.get_window_extent(renderer))


def test_legends_sit_outside_the_data_and_series_are_named_in_words(tmp_path, closed_figures):
    plots.plot_history(_history(3, True), tmp_path, title="t")
    for figure in closed_figures:
        for axis in figure.axes:
            if axis.get_legend() is not None:
                assert not _overlaps(figure, axis.get_legend(), axis)
    losses = closed_figures[0].axes[0]
    names = [text.get_text() for text in losses.get_legend().get_texts()]
    assert "feature head: diffusion loss" in names and "cross-entropy loss" in names and "total loss" in names
    assert not any("train_" in name or "/" in name or "_" in name for name in names)


def test_twenty_loss_series_get_distinct_colour_and_style(tmp_path, closed_figures):
    rows = [{"epoch": epoch, **{f"train_level{i}/kd_loss": (i + 1) / epoch for i in range(20)}} for epoch in (1, 2)]
    plots.plot_history(rows, tmp_path, title="t")
    lines = [line for line in closed_figures[0].axes[0].get_lines()]
    assert len(lines) == 20
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 20


def test_gamma_spread_is_clipped_to_its_range(tmp_path, closed_figures):
    rows = _history(3, True)
    for row in rows:
        row["train_logit/gamma_std"] = 0.5  # mean 0.9 ± 0.5 would reach 1.4
    plots.plot_history(rows, tmp_path, title="t")
    logit_gamma_axis = closed_figures[-1].axes[3]
    band = logit_gamma_axis.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(1.0) and band.min() == pytest.approx(0.4)
    assert logit_gamma_axis.get_ylim() == (0.0, 1.05)


@pytest.mark.parametrize("columns, panels", [
    ({"val_top1": 70.0, "val_top5": 95.0, "train_top1": 72.0}, ["top-1 accuracy (%)", "top-5 accuracy (%)"]),
    ({"val_map": 20.0, "val_map50": 40.0}, ["box mAP@[.5:.95] (%)", "box mAP@.5 (%)"]),
    ({"val_miou": 50.0, "val_pixel_accuracy": 90.0}, ["mean IoU over classes (%)", "pixel accuracy (%)"]),
])
def test_the_metric_plot_draws_each_tasks_metrics_on_their_own_axes(columns, panels, tmp_path, closed_figures):
    rows = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5, **columns}]  # evaluated once
    plots.plot_history(rows, tmp_path, title="t")
    axes = closed_figures[1].axes
    assert [axis.get_ylabel() for axis in axes] == panels
    test_line = next(line for line in axes[0].get_lines() if line.get_label().startswith("test set"))
    assert "evaluated at epoch 2" in test_line.get_label() and test_line.get_markersize() >= 6
    assert any(text.get_text() == f"{list(columns.values())[0]:.2f}" for text in axes[0].texts)  # its number


def test_the_demo_comparison_starts_at_zero_and_shows_the_paired_difference(tmp_path, closed_figures):
    results = {"alone": [(0, 73.0), (1, 73.5), (2, 74.0)], "with DiffKD": [(0, 74.0), (1, 74.0), (2, 75.5)]}
    plots.plot_demo_comparison(results, tmp_path / "c.png", title="t", teacher=("resnet14", 90.0))
    values, difference = closed_figures[-1].axes
    assert values.get_ylim()[0] == 0.0 and "axis from 0" in values.get_ylabel()
    legend = [text.get_text() for text in values.get_legend().get_texts()]
    assert "teacher resnet14: 90.00" in legend and "mean ± std over seeds" in legend
    mean_marker = next(line for line in values.get_lines() if line.get_marker() == "D")
    assert mean_marker.get_ydata()[0] == pytest.approx(73.5)
    # differences 1.0, 0.5, 1.5: mean 1.0, std 0.5, 95% CI ± 4.303 · 0.5 / √3
    bars = difference.collections[-1].get_segments()[0][:, 1]
    assert bars == pytest.approx([1.0 - 4.303 * 0.5 / 3 ** 0.5, 1.0 + 4.303 * 0.5 / 3 ** 0.5], abs=1e-3)
    assert "with DiffKD − alone" in difference.get_ylabel()
