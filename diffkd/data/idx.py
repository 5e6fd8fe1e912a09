"""Reader for the IDX format of (Fashion-)MNIST, gzipped or plain.

An IDX file is: two zero bytes, a dtype code byte, a byte giving the number of dimensions, one big-endian
uint32 per dimension, then the values in big-endian, row-major order.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; truncation raises EOFError
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({error}); delete the file and fetch it "
                         f"again") from error


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not, recognised by content) into a native-endian, writable numpy array.

    Raises FileNotFoundError if the file is missing and ValueError, naming the file, for a bad header, an
    unknown dtype code or a payload whose size does not match the header's dimensions.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header (needs at least 4)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file: the first two bytes are {data[:2].hex()}, expected 0000")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{dtype_code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {header_size} bytes, "
                         f"the file has {len(data)}")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[dtype_code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX payload {problem}: header says shape {shape} of {dtype.name} "
                         f"({expected} bytes with the header), the file has {len(data)} bytes")
    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a copy: native byte order and writable
