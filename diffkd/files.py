"""Files the library writes and reads: one atomic writer and one checked ``torch.load`` for every caller.

Results (checkpoints, exports, summaries) are written through a temporary file in the target folder and renamed
into place, so a crash, a full disk or Ctrl-C never leaves half a file where a good one was.  They get the
ordinary permissions of the user's umask (``mkstemp`` would make them private).  Weight files are read with
``torch.load(weights_only=True)``; a damaged or unsafe file raises a ValueError that says what to do.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Calls ``write(file)`` on a temporary file next to ``path``, syncs it and renames it to ``path``."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda file: file.write(text.encode()))


def save_atomically(content, path: str | os.PathLike) -> Path:
    """``torch.save(content)`` to ``path`` through :func:`write_atomically`."""
    return write_atomically(path, lambda file: torch.save(content, file))


def load_weights_file(path: str | os.PathLike):
    """The content of a ``.pth``/``.pt`` (``torch.load(weights_only=True)``, on the CPU) or ``.safetensors`` file.

    A missing file raises FileNotFoundError; a damaged one, or one holding Python objects that
    ``weights_only`` refuses, a ValueError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist or is not a file")

    def damaged(error: Exception) -> ValueError:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ValueError(f"checkpoint '{path}' could not be read ({first_line}); the file looks truncated or "
                          f"corrupted. Copy it again, or, if a run was writing it, use the other checkpoint of the "
                          f"run (last.pth / best.pth)")

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError for damaged headers and data
            raise damaged(error) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            first_line = str(error).strip().splitlines()[0]
            raise ValueError(
                f"checkpoint '{path}' holds Python objects that torch.load(weights_only=True) refuses to unpickle "
                f"({first_line}). Only tensors, numbers, strings and plain containers are accepted; if you trust the "
                f"file, load it once with weights_only=False and re-save just its state dict.") from error
        raise damaged(error) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # how torch.load reports damaged files
        raise damaged(error) from error


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's content (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
