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
import zipfile
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


# How torch.save's two formats begin: a zip archive holding ``<name>/data.pkl``, or (before PyTorch 1.6, and with
# ``_use_new_zipfile_serialization=False``) a pickle of this magic number.
_ZIP_SIGNATURE = b"PK\x03\x04"
_LEGACY_TORCH_SIGNATURE = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
# Other kinds of file people pass by mistake, recognised by their first bytes.
_SIGNATURES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
               b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive", b"BZh": "a bzip2 archive",
               b"\xfd7zXZ": "an xz archive", b"\x93NUMPY": "a NumPy array file (.npy)"}


def not_a_checkpoint(path: str | os.PathLike) -> str | None:
    """None when the file is laid out like a checkpoint (torch.save's zip or legacy format, or safetensors), else
    what it looks like instead ("a text file (it starts 'epoch,steps')", "a PNG image", ...).

    Only the layout is checked: a truncated or corrupted checkpoint passes here and fails in ``torch.load``."""
    path = Path(path)
    with open(path, "rb") as file:
        head = file.read(512)
    if not head:
        return "an empty file"
    if head.startswith(_ZIP_SIGNATURE):
        if not zipfile.is_zipfile(path):
            return None  # a zip cut short: torch.load says it is damaged
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("data.pkl") for name in names):
            return None
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"a zip archive of something else (it holds {shown or 'nothing'}, not torch.save's data.pkl)"
    if head.startswith(_LEGACY_TORCH_SIGNATURE[:len(head)]):
        return None
    if path.suffix == ".safetensors":
        return None  # named as one: its own loader says what is wrong with a damaged one
    for signature, kind in _SIGNATURES.items():
        if head.startswith(signature):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a multi-byte character cut by the 512-byte read
            return f"a binary file of an unknown kind (it starts with bytes {head[:8].hex(' ')})"
        text = head[:error.start].decode("utf-8")
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"a text file (it starts {first_line[:40]!r})"


def load_weights_file(path: str | os.PathLike):
    """The content of a ``.pth``/``.pt`` (``torch.load(weights_only=True)``, on the CPU) or ``.safetensors`` file.

    A missing file raises FileNotFoundError; a file that is no checkpoint at all (text, an image, a zip of
    something else), a damaged one, or one holding Python objects that ``weights_only`` refuses, a ValueError
    naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist or is not a file")
    kind = not_a_checkpoint(path)
    if kind is not None:
        raise ValueError(f"'{path}' is not a checkpoint: it is {kind}; pass a weight file written by torch.save "
                         f"(.pth / .pt) or a .safetensors file")

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
    except Exception as error:  # the file is laid out as a checkpoint, so any failure to unpickle it is damage
        raise damaged(error) from error


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's content (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
