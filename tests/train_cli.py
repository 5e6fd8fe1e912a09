"""Fixtures and helpers for the tests that run ``python -m diffkd.train`` / ``diffkd.eval`` in-process.

``data_dir`` writes a tiny Fashion-MNIST as real gzipped IDX files (the Debian package's format), so every run
goes through the same data path as the demo; ``teacher_ckpt`` is a resnet14 in the CIFAR benchmark's format.
"""
import csv
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from diffkd.models import create_model, save_checkpoint_benchmark_format

REPO = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """48 training and 24 test images; each class is a bright patch at its own place, so it can be learnt."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("t10k", 24)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 60, size=(count, 28, 28))
        for image, label in zip(images, labels):
            row, column = divmod(int(label), 4)
            image[row * 7:row * 7 + 7, column * 7:column * 7 + 7] += 180
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A resnet14 teacher in the CIFAR benchmark's checkpoint format ({"model": state_dict, ...})."""
    torch.manual_seed(1)
    model = create_model("resnet14", num_classes=10, in_chans=1)
    return save_checkpoint_benchmark_format(model, tmp_path_factory.mktemp("teacher") / "ckpt_epoch_240.pth",
                                            epoch=240, accuracy=90.0)


def run_cli(module, argv, capsys) -> tuple[int, str, str]:
    """Runs a CLI in-process: (exit code, stdout, stderr); argparse's own errors exit through SystemExit."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def common(data_dir, output, **flags) -> list[str]:
    settings = {"--data-dir": data_dir, "--output": output, "--student": "resnet8", "--epochs": 1,
                "-b": 8, "--lr": 0.05, "--log-interval": 2, **flags}
    return [str(token) for key, value in settings.items() if value is not None
            for token in ((key,) if value is True else (key, value))]


def distill(data_dir, output, teacher_ckpt, method="diffkd", **flags) -> list[str]:
    return common(data_dir, output, **{"--method": method, "--teacher": "resnet14", "--teacher-ckpt": teacher_ckpt,
                                       **flags})


def read_summary(folder: Path) -> list[dict]:
    with open(folder / "summary.csv") as file:
        return list(csv.DictReader(file))


def assert_clean_failure(code, err, *needles, expected_code=2):
    assert code == expected_code, err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
