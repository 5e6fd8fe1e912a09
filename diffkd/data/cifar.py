"""CIFAR-100 in its python format (`cifar-100-python/{train,test,meta}`), read without running pickled code.

The files are Python 2 pickles of dicts holding bytes, lists of ints and one numpy uint8 array. Unpickling can
call any importable function, so a restricted unpickler resolves only the three numpy globals an array needs
and refuses every other global (os.system, builtins.eval, ...) before anything is called.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffkd.data.in_memory import InMemoryImageDataset, TensorImageTransform

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

# The real files name numpy.core (numpy 1.x); numpy 2 writes numpy._core.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
_NUM_CLASSES = 100
_IMAGE_SHAPE = (3, 32, 32)
_HOW_TO_GET = ("Download the python version of CIFAR-100 (cifar-100-python.tar.gz from "
               "https://www.cs.toronto.edu/~kriz/cifar.html), extract it with `tar xzf cifar-100-python.tar.gz` "
               "and pass --data-dir with the folder that holds cifar-100-python/ (or cifar-100-python itself).")


class _NumpyArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name} (only {allowed} are "
                                         f"allowed; a genuine CIFAR-100 file needs nothing else)") from None


def load_restricted_pickle(path: str | Path) -> Any:
    """Unpickle a CIFAR python-format file (bytes keys, as written by Python 2) allowing only numpy arrays.

    Any failure, a refused global included, raises ValueError naming the file; nothing in it is executed.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return _NumpyArraysOnlyUnpickler(handle, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError) as error:
            raise ValueError(f"{path}: not a valid CIFAR python-format pickle: {error}") from error


def _field(content: Any, key: bytes, path: Path) -> Any:
    if not isinstance(content, dict) or key not in content:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path}: expected a dict with the key {key!r} (CIFAR-100 python format), found {found}")
    return content[key]


def resolve_cifar100_dir(root: str | Path) -> Path:
    """The `cifar-100-python` folder given it or its parent; FileNotFoundError with instructions otherwise."""
    root = Path(root)
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        raise FileNotFoundError(f"CIFAR-100: {root} is the archive, not the extracted data. Run "
                                f"`tar xzf {root} -C {root.parent}` and pass --data-dir {root.parent}")
    for candidate in (root / "cifar-100-python", root):
        if (candidate / "meta").is_file():
            return candidate
    raise FileNotFoundError(f"CIFAR-100: found neither {root / 'cifar-100-python' / 'meta'} nor {root / 'meta'}; "
                            f"expected a cifar-100-python folder holding the files train, test and meta. "
                            f"{_HOW_TO_GET}")


class CIFAR100(InMemoryImageDataset):
    """CIFAR-100's training (50,000) or test (10,000) split: 3×32×32 uint8 images, 100 fine labels."""

    def __init__(self, root: str | Path, train: bool = True, transform: TensorImageTransform | None = None, *,
                 augment_seed: int = 0):
        folder = resolve_cifar100_dir(root)
        split_path = folder / ("train" if train else "test")
        if not split_path.is_file():
            raise FileNotFoundError(f"CIFAR-100: {split_path} is missing (the folder {folder} should hold train, "
                                    f"test and meta). {_HOW_TO_GET}")
        meta_path = folder / "meta"
        class_names = _field(load_restricted_pickle(meta_path), b"fine_label_names", meta_path)
        if len(class_names) != _NUM_CLASSES:
            raise ValueError(f"{meta_path}: expected {_NUM_CLASSES} fine label names, found {len(class_names)}")
        content = load_restricted_pickle(split_path)
        data = _field(content, b"data", split_path)
        labels = np.asarray(_field(content, b"fine_labels", split_path))
        row_size = int(np.prod(_IMAGE_SHAPE))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row_size:
            description = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{split_path}: expected b'data' to be a uint8 array of shape N×{row_size}, "
                             f"found {description}")
        if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(f"{split_path}: expected {data.shape[0]} integer fine labels, found {labels.dtype} "
                             f"{labels.shape}")
        if labels.size and not (labels.min() >= 0 and labels.max() < _NUM_CLASSES):
            raise ValueError(f"{split_path}: fine labels must be in 0..{_NUM_CLASSES - 1}, found "
                             f"{labels.min()}..{labels.max()}")
        # Each row is the red, green then blue 32×32 plane: N×3×32×32 without moving data (torch wants a
        # writable array; one unpickled from bytes may be read-only).
        images = torch.from_numpy(np.require(data, requirements=["C", "W"]).reshape(-1, *_IMAGE_SHAPE))
        super().__init__(images, torch.from_numpy(labels.astype(np.int64)),
                         [name.decode("ascii") if isinstance(name, bytes) else str(name) for name in class_names],
                         transform, augment_seed=augment_seed)
        self.root = folder
        self.train = train
