"""The report of benchmarks/bench_gap.py: markdown, PNG chart and JSON from every finished run of its work folder.

Per run: test top-1, γ of the DiffKD heads (the last epoch's training mean, summary.csv), the noise gap of the
student's feature to its teacher's (:mod:`diffkd.noise_gap`, measured here from the run's last.pth on
NOISE_IMAGES training and NOISE_IMAGES test images, cached as noise-gap-<teacher>.json in the run folder), for
even seeds s the same between the students of seeds s and s + 1 (the seed-to-seed reference level, cached as
noise-gap-<variant>-seed<s + 1>.json) and the provenance of its launches.  The paired comparisons (seed-matched
differences with 95% t-intervals, from benchmarks/bench_accuracy.py) are one family: their p-values get Holm's
correction over the number of comparisons that have at least two seeds, and the report says how many that is.
The questions of the issue are answered only where runs exist; otherwise the report says "not measured".

    python benchmarks/gap_report.py --work-dir output/bench-gap --out benchmarks/results/gap-fashion-mnist
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_accuracy import paired_difference, subprocess_runner, t_cdf
from benchmarks.bench_gap import STUDY, VARIANTS, GapStudy

NOISE_IMAGES = 5000
NOISE_POINT = "feature/raw"  # the backbone's feature map against the teacher's: measured for every run
NEXT_SEED = "next seed"  # the seed-to-seed reference: seed s's student against seed s + 1's, same arm and variant
# (name, arm of a, variant a, arm of b, variant b, what it asks): a − b paired by seed.
COMPARISONS = [
    ("DiffKD − MSE, main", "main", "diffkd", "main", "mse", "the paper's claim: DiffKD beats plain feature MSE"),
    ("DiffKD − MSE, gap", "gap", "diffkd", "gap", "mse", "the same with the larger teacher"),
    ("DiffKD − KD, main", "main", "diffkd", "main", "kd", "DiffKD beats KD on logits"),
    ("DiffKD − alone, main", "main", "diffkd", "main", "none", "DiffKD helps the student"),
    ("MSE − alone, main", "main", "mse", "main", "none", "plain feature MSE helps the student"),
    # The ablations, each asked the way the paper's open questions put it (all on the main arm's pair).
    ("ANM − no ANM", "main", "diffkd", "main", "diffkd-no-anm", "does adaptive noise matching help?"),
    ("AE 32 − no compression", "main", "diffkd-ae32", "main", "diffkd",
     "does the linear autoencoder help the feature head?"),
    ("AE 32 − PCA 32", "main", "diffkd-ae32", "main", "diffkd-pca32",
     "the learned linear autoencoder against PCA of the teacher's feature, same width"),
    ("AE 32 − random 32", "main", "diffkd-ae32", "main", "diffkd-random32",
     "the learned linear autoencoder against a fixed random projection, same width"),
    ("MSE − cosine distance", "main", "diffkd", "main", "diffkd-cosine",
     "the paper's MSE on the denoised feature against cosine distance"),
    ("MSE − Pearson distance", "main", "diffkd", "main", "diffkd-pearson",
     "the paper's MSE on the denoised feature against Pearson distance"),
    ("NFE 5 − NFE 1", "main", "diffkd", "main", "diffkd-nfe1", "do five denoising steps beat one?"),
    ("feature head + KD − feature head", "main", "diffkd-feature-kd", "main", "diffkd-feature",
     "DiffKD combined with KD on the logits"),
]
CHART_ROWS = ("DiffKD − MSE, main", "DiffKD − MSE, gap", "difference of gains (gap − main)", "DiffKD − KD, main",
              "DiffKD − alone, main")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input's order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def p_value(differences: Sequence[float]) -> float:
    """Two-sided p of the paired t-test that the mean difference is 0 (NaN with fewer than 2 seeds)."""
    if len(differences) < 2:
        return math.nan
    std = statistics.stdev(differences)
    if std == 0:
        return 0.0 if statistics.mean(differences) != 0 else 1.0
    t = statistics.mean(differences) / (std / math.sqrt(len(differences)))
    return 2 * (1 - t_cdf(abs(t), len(differences) - 1))


def _arms(work_dir: Path, epochs: int | None) -> dict[str, GapStudy]:
    arms = {}
    for arm in ("main", "gap"):
        path = work_dir / arm / "study.json"
        if path.is_file():
            settings = json.loads(path.read_text())
            if epochs is not None and settings["epochs"] != epochs:
                raise ValueError(f"{path} holds {settings['epochs']}-epoch runs, not {epochs}")
            arms[arm] = GapStudy(work_dir / arm, settings, teacher_epochs=1, train=subprocess_runner(),
                                 evaluate=subprocess_runner("diffkd.eval"))
    return arms


def _teacher_file(study: GapStudy) -> str | None:
    """The teacher weight file the arm's runs were launched with (their provenance)."""
    for path in sorted((study.work_dir / "provenance").glob("*.json")):
        files = [launch["teacher_file"] for launch in json.loads(path.read_text()) if launch.get("teacher_file")]
        if files:
            return files[-1]
    return None


def _cached(cache: Path, measure) -> dict:
    """``measure()``'s noise gaps as a dict, kept in the JSON file ``cache`` (a finished run never changes)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    from diffkd.noise_gap import as_dict

    torch.set_num_threads(1)  # like the runs: one core of a shared machine
    gaps = as_dict(measure())
    cache.write_text(json.dumps(gaps, indent=1) + "\n")
    return gaps


def _checkpoint(folder: Path) -> dict:
    import torch

    return torch.load(folder / "last.pth", map_location="cpu", weights_only=False)


def noise_gap(folder: Path, teacher: tuple[str, str], batches) -> dict:
    """The run's noise gap against ``teacher`` = (name, weight file), cached next to its last.pth."""
    from diffkd.noise_gap import measure_checkpoint

    def measure():
        checkpoint = _checkpoint(folder)
        own_teacher = checkpoint["args"].get("teacher") == teacher[0] and checkpoint["args"].get("method") == "diffkd"
        fit, test, info = batches()
        return measure_checkpoint(checkpoint, fit, test, info, teacher=None if own_teacher else teacher)

    return _cached(folder / f"noise-gap-{teacher[0]}.json", measure)


def seed_to_seed(folder: Path, other: Path, batches) -> dict:
    """The run's student against the student of the run in ``other`` (the next seed of the same variant)."""
    from diffkd.noise_gap import measure_runs

    def measure():
        fit, test, info = batches()
        return measure_runs(_checkpoint(folder), _checkpoint(other), fit, test, info)

    return _cached(folder / f"noise-gap-{other.name}.json", measure)


def collect(arms: Mapping[str, GapStudy], measure_noise: bool = True) -> dict:
    """arm → variant → seed → {top1, gamma, noise gaps, provenance}."""
    cached: list = []

    def batches():
        if not cached:
            from diffkd.noise_gap import measurement_batches
            cached.append(measurement_batches(STUDY["dataset"], None, fit_images=NOISE_IMAGES,
                                              test_images=NOISE_IMAGES))
        return cached[0]

    teachers = {arm: (s.settings["teacher"], _teacher_file(s)) for arm, s in arms.items()}
    table: dict = {}
    for arm, study in arms.items():
        for variant, rows in study.results().items():
            for seed, row in rows.items():
                run = f"{variant}-seed{seed}"
                entry = {"top1": float(row["val_top1"]), "provenance": study.provenance(run),
                         "gamma": {h: float(row[f"train_{h}/gamma"]) for h in ("feature", "logit")
                                   if row.get(f"train_{h}/gamma")}, "noise_gap": {}}
                for other, (name, file) in teachers.items():
                    # every run against its own teacher; the student alone also against the other arm's teacher
                    if measure_noise and file and (other == arm or variant == "none"):
                        entry["noise_gap"][name] = noise_gap(study.runs_dir / run, (name, file), batches)
                if measure_noise and seed % 2 == 0 and seed + 1 in rows:  # disjoint pairs of seeds: (0, 1), (2, 3)…
                    entry["noise_gap"][NEXT_SEED] = seed_to_seed(study.runs_dir / run,
                                                                 study.runs_dir / f"{variant}-seed{seed + 1}", batches)
                table.setdefault(arm, {}).setdefault(variant, {})[seed] = entry
    return table


def _values(table: Mapping, arm: str, variant: str, key=lambda e: e["top1"]) -> dict[int, float]:
    out = {}
    for seed, entry in table.get(arm, {}).get(variant, {}).items():
        value = key(entry)
        if value is not None:
            out[seed] = value
    return out


def _noise(teacher: str, point: str = NOISE_POINT, field: str = "one_minus_r2"):
    return lambda e: e["noise_gap"].get(teacher, {}).get(point, {}).get("student_to_teacher", {}).get(field)


def comparisons(table: Mapping) -> list[dict]:
    """Every comparison with data: paired difference, CI, per-seed values, p and Holm's adjusted p."""
    out = []
    for name, arm_a, a, arm_b, b, question in COMPARISONS:
        values_a, values_b = _values(table, arm_a, a), _values(table, arm_b, b)
        d = paired_difference(values_a, values_b)
        if d is not None:
            out.append({"name": name, "question": question, **asdict(d),
                        "per_seed": {s: values_a[s] - values_b[s] for s in d.seeds}})
    main_gain = {s: v for s, v in (next((c["per_seed"] for c in out if c["name"] == "DiffKD − MSE, main"), {})).items()}
    gap_gain = next((c["per_seed"] for c in out if c["name"] == "DiffKD − MSE, gap"), {})
    d = paired_difference(gap_gain, main_gain)
    if d is not None:
        out.insert(2, {"name": "difference of gains (gap − main)", "question": "does DiffKD − MSE grow with the "
                       "capacity gap?", **asdict(d), "per_seed": {s: gap_gain[s] - main_gain[s] for s in d.seeds}})
    tested = [c for c in out if len(c["seeds"]) >= 2]
    for c in out:
        c["p"] = p_value(list(c["per_seed"].values()))
    for c, adjusted in zip(tested, holm([c["p"] for c in tested])):
        c["p_holm"] = adjusted
    return out


def questions(table: Mapping, teachers: Mapping[str, str], compared: Sequence[dict]) -> list[str]:
    """The issue's three questions, answered from the data there is."""
    lines = []
    alone_main = _values(table, "main", "none", _noise(teachers.get("main", "")))
    alone_gap = _values(table, "main", "none", _noise(teachers.get("gap", "")))
    d = paired_difference(alone_gap, alone_main) if "gap" in teachers else None
    lines.append("1. Does the noise gap grow with the capacity gap? " + (
        f"The student trained alone, read out linearly as each teacher's feature (1 − R², test images): "
        f"{statistics.mean(alone_main[s] for s in d.seeds):.3f} for {teachers['main']}, "
        f"{statistics.mean(alone_gap[s] for s in d.seeds):.3f} for {teachers['gap']}; difference "
        f"{_interval(d, 3)} over {len(d.seeds)} seed(s)." if d else
        "Not measured: it needs the student-alone runs and both teachers.") + _seed_reference(table))
    gains = next((c for c in compared if c["name"] == "difference of gains (gap − main)"), None)
    lines.append("2. Does DiffKD − MSE grow with the capacity gap? " + (
        f"Gap arm minus main arm, paired by seed: {_interval(gains, 2)} points over {len(gains['seeds'])} seed(s)."
        if gains else "Not measured: the gap arm has no seed in common with the main arm yet."))
    lines.append("3. Does γ track the noise gap? " + _gamma_answer(table, teachers))
    return lines


def _gamma_answer(table: Mapping, teachers: Mapping[str, str]) -> str:
    """Question 3.  Within one arm the noise gap hardly varies, and runs pooled over both arms mix the teacher change
    into any correlation, so the across-teacher answer pairs each seed's DiffKD run in the gap arm with the same
    seed's run in the main arm."""
    gammas, noises = {}, {}
    for arm, teacher in teachers.items():
        gamma = _values(table, arm, "diffkd", lambda e: e["gamma"].get("feature"))
        noise = _values(table, arm, "diffkd", _noise(teacher))
        gammas[arm] = {s: gamma[s] for s in sorted(gamma.keys() & noise.keys())}
        noises[arm] = {s: noise[s] for s in gammas[arm]}
    parts = []
    noise = paired_difference(noises["gap"], noises.get("main", {})) if "gap" in teachers else None
    if noise is not None:
        gamma = paired_difference(gammas["gap"], gammas["main"])
        parts.append(f"With {teachers['gap']} instead of {teachers['main']}, paired by seed "
                     f"({len(noise.seeds)} seed(s)), the DiffKD student's 1 − R² to its teacher changes by "
                     f"{_interval(noise, 3)} and the feature head's γ by {_interval(gamma, 4)} (γ below 1: the "
                     f"head mixes noise into the student's feature before denoising; a falling γ means more).")
    for arm in teachers:
        g, n = list(gammas[arm].values()), list(noises[arm].values())
        if len(g) >= 3 and len(set(g)) > 1 and len(set(n)) > 1:
            parts.append(f"Within the {arm} arm, Pearson r = {statistics.correlation(g, n):+.2f} between "
                         f"γ and 1 − R² over {len(g)} runs (exploratory; γ {min(g):.3f}–{max(g):.3f}).")
    if not parts:
        count = sum(len(by_seed) for by_seed in gammas.values())
        return (f"Not measured: {count} DiffKD run(s) with both numbers (it needs the same seed in both arms, or at "
                f"least 3 runs with varying values in one arm).")
    return " ".join(parts)


def _seed_reference(table: Mapping) -> str:
    """The student-alone seed-to-seed gap, the reference level for the gap to a teacher."""
    pairs = list(_values(table, "main", "none", _noise(NEXT_SEED)).values())
    if not pairs:
        return ""
    return (f" For reference, two seeds of the student alone leave {statistics.mean(pairs):.3f} of each other's "
            f"feature unexplained ({len(pairs)} pair(s) of seeds): a gap to a teacher near that level is no larger "
            f"than what separates two seeds of one recipe.")


def _interval(d, digits: int = 2) -> str:
    d = d if isinstance(d, Mapping) else asdict(d)
    if math.isnan(d["low"]):
        return f"{d['mean']:+.{digits}f} (1 seed, no interval)"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _p(c: Mapping) -> str:
    if "p_holm" not in c:
        return "–"
    return f"{c['p']:.3f} / {c['p_holm']:.3f}" + (" (significant)" if c["p_holm"] < 0.05 else "")


def teacher_caveat(teacher_top1: Mapping[str, str]) -> str:
    """A warning when the larger teacher is not the more accurate one: the gap arm then mixes capacity with accuracy."""
    try:
        main, gap = float(teacher_top1["main"]), float(teacher_top1["gap"])
    except (KeyError, ValueError):  # an arm without runs, or "not measured"
        return ""
    if gap > main:
        return ""
    return (f" **Caveat: the gap arm's teacher ({gap:.2f}) is not more accurate than the main arm's ({main:.2f}), so a "
            f"difference between the arms mixes the capacity gap with the teacher's accuracy.**")


def render_markdown(table: Mapping, arms: Mapping[str, GapStudy], compared: Sequence[dict], meta: Mapping) -> str:
    teachers = {arm: s.settings["teacher"] for arm, s in arms.items()}
    tested = sum("p_holm" in c for c in compared)
    lines = [f"# When does DiffKD beat plain feature MSE? Fashion-MNIST, {meta['date']}", "",
             f"Student {meta['student']}, {meta['training']} (batch 64, SGD lr "
             f"0.1, cosine, weight decay 5e-4, float32, one thread per run); test top-1 (%) on the 10,000 test "
             f"images. Teachers: " + ", ".join(f"{arm} arm {t} (test top-1 {meta['teacher_top1'][arm]})"
                                              for arm, t in teachers.items()) +
             f". Written by `python benchmarks/gap_report.py` from {meta['work_dir']}; the recipe and why: "
             f"benchmarks/bench_gap.py's docstring." + teacher_caveat(meta["teacher_top1"]), "",
             "## Top-1 per variant", "", "| arm | variant | seeds | top-1 mean ± std | per seed (seed: top-1) |",
             "| --- | --- | --- | --- | --- |"]
    for arm in table:
        for variant in VARIANTS:
            values = _values(table, arm, variant)
            if values:
                spread = f" ± {statistics.stdev(values.values()):.2f}" if len(values) > 1 else ""
                lines.append(f"| {arm} | {variant}: {VARIANTS[variant].description} | {len(values)} | "
                             f"{statistics.mean(values.values()):.2f}{spread} | "
                             + ", ".join(f"{s}: {v:.2f}" for s, v in values.items()) + " |")
    lines += ["", f"## Paired comparisons ({tested} with ≥ 2 seeds; Holm's correction over those {tested})", "",
              "Δ top-1: the seed-matched difference with its 95% t-interval (not corrected); p: the paired t-test, "
              "raw / Holm-adjusted. Only a Holm-adjusted p below 0.05 is called significant; everything else is "
              "exploratory.", "", "| comparison | what it asks | seeds | Δ top-1 [95% CI] | p raw / Holm |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c['name']} | {c['question']} | {len(c['seeds'])} | {_interval(c)} | {_p(c)} |" for c in compared]
    lines += ["", "## The noise gap and γ (mean over seeds)", "",
              "1 − R²: the share of the teacher feature's variance on test images that a ridge map from the student's "
              "feature (fitted on training images) leaves unexplained; SNR: explained over residual energy; CKA: "
              "linear CKA (no map fitted). Definitions and limits: diffkd/noise_gap.py. γ: the DiffKD feature "
              "head's noise-adapter weight, last epoch (1 = no noise added). Against \"next seed\": the student of "
              "seed s read out as the student of seed s + 1 (same arm and variant; disjoint pairs, counted in the "
              "seeds column): what is specific to the seed, the reference level for the gap to a teacher.", "",
              "| arm | variant | against | seeds | raw 1 − R² | raw SNR | raw CKA | DiffKD: projection → denoised "
              "1 − R² | γ feature / logit |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in table:
        for variant, entries in table[arm].items():
            gammas = " / ".join(f"{statistics.mean(vs):.3f}" if vs else "–" for vs in (
                [e["gamma"][h] for e in entries.values() if h in e["gamma"]] for h in ("feature", "logit")))
            measured = sorted({t for e in entries.values() for t in e["noise_gap"]}, key=lambda t: (t == NEXT_SEED, t))
            for teacher in measured or ["–"]:
                gaps = [e["noise_gap"][teacher] for e in entries.values() if teacher in e["noise_gap"]]

                def mean(point: str, field: str = "one_minus_r2") -> str:
                    values = [g[point]["cka"] if field == "cka" else g[point]["student_to_teacher"][field]
                              for g in gaps if point in g]
                    return f"{statistics.mean(values):.3f}" if values else "–"

                chain = f"{mean('feature/projection')} → {mean('feature/denoised')}" if any(
                    "feature/denoised" in g for g in gaps) else "–"
                lines.append(f"| {arm} | {variant} | {teacher} | {len(gaps)} | {mean(NOISE_POINT)} | "
                             f"{mean(NOISE_POINT, 'snr')} | {mean(NOISE_POINT, 'cka')} | {chain} | {gammas} |")
    lines += ["", "## The issue's questions", "", *questions(table, teachers, compared), ""]
    return "\n".join(lines)


def plot(compared: Sequence[dict], meta: Mapping, teachers: Mapping[str, str], path: Path) -> None:
    """The paper's comparisons, DiffKD − MSE first, then the rest of the report's below a line: each seed as a
    point, the mean with its 95% CI, a zero line."""
    from diffkd.plots import plt

    headline = [c for name in CHART_ROWS for c in compared if c["name"] == name]
    rows = headline + [c for c in compared if c["name"] not in CHART_ROWS]
    figure, axis = plt.subplots(figsize=(9, 1.0 + 0.6 * max(len(rows), 1)), dpi=110)
    single_labelled = False
    for position, c in enumerate(rows):
        y = len(rows) - 1 - position
        seeds = list(c["per_seed"].values())
        offsets = [(i - (len(seeds) - 1) / 2) * 0.2 / max(len(seeds), 1) for i in range(len(seeds))]
        axis.scatter(seeds, [y + 0.18 + o for o in offsets], s=18, color="tab:blue", alpha=0.7,
                     label="one seed" if position == 0 else None, zorder=2)
        if not math.isnan(c["low"]):
            axis.errorbar([c["mean"]], [y - 0.1], xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]], fmt="D",
                          color="black", markerfacecolor="white", capsize=4, zorder=3,
                          label="mean, 95% CI (paired)" if position == 0 else None)
        else:
            axis.scatter([c["mean"]], [y - 0.1], marker="D", edgecolor="black", facecolor="white", zorder=3,
                         label=None if single_labelled else "mean (one seed: no interval)")
            single_labelled = True
    axis.axvline(0, color="grey", linewidth=1, zorder=1, label="no difference")
    if headline and len(rows) > len(headline):
        axis.axhline(len(rows) - len(headline) - 0.5, color="grey", linestyle="--", linewidth=0.8, zorder=1)
    axis.set_yticks(range(len(rows)), [f"{c['name']}  (n = {len(c['seeds'])})" for c in reversed(rows)])
    axis.set_ylim(-0.7, len(rows) - 0.3)
    axis.set_xlabel("Δ test top-1 (percentage points)")
    axis.grid(axis="x", alpha=0.3)
    teacher_text = "; ".join(f"{teachers[a]} teacher: test top-1 {meta['teacher_top1'][a]}%" for a in teachers)
    axis.set_title(f"Fashion-MNIST, {meta['student']} student, {meta['training']}\n({teacher_text})",
                   fontsize="medium")
    if rows:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write(work_dir: Path, out: Path, epochs: int | None = None, measure_noise: bool = True) -> str:
    arms = _arms(work_dir, epochs)
    if not arms:
        raise ValueError(f"{work_dir} holds no study (no main/ or gap/ folder with study.json)")
    table = collect(arms, measure_noise)
    if not table:
        raise ValueError(f"no finished run in {work_dir} to report on")
    compared = comparisons(table)
    teachers = {arm: s.settings["teacher"] for arm, s in arms.items()}
    settings = next(iter(arms.values())).settings
    meta = {"date": datetime.date.today().isoformat(), "work_dir": str(work_dir), "student": settings["student"],
            "training": f"{settings['epochs']} epoch(s) on {settings['train_subset']:,} training images",
            "teacher_top1": {arm: s.teacher_top1() for arm, s in arms.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(table, arms, compared, meta)
    out.with_suffix(".md").write_text(markdown)
    plot(compared, meta, teachers, out.with_suffix(".png"))
    payload = {"meta": meta, "settings": {arm: s.settings for arm, s in arms.items()}, "comparisons": compared,
               "holm_family_size": sum("p_holm" in c for c in compared), "runs": table}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="bench_gap's work folder")
    parser.add_argument("--out", type=Path, required=True, help="report files without suffix (.md, .png, .json)")
    parser.add_argument("--epochs", type=int, help="check that the runs have this many epochs")
    parser.add_argument("--no-noise-gap", action="store_true", help="skip measuring the noise gap of new runs")
    args = parser.parse_args(argv)
    try:
        print(write(args.work_dir, args.out, args.epochs, not args.no_noise_gap), flush=True)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
