"""Reader for the IDX format of the original MNIST files (plain or gzipped).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the big-endian values.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Return the array stored in an IDX file (``.gz`` is decompressed)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header is truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_mnist_files(directory: Path) -> dict[str, Path] | None:
    """Locate the four MNIST IDX files in ``directory`` (or torchvision's ``MNIST/raw``).

    Accepts the ``.gz`` downloads and the dotted variant (``train-images.idx3-ubyte``).
    Returns ``None`` when any of the four is missing.
    """
    for root in (Path(directory), Path(directory) / "MNIST" / "raw"):
        found = {}
        for role, name in MNIST_FILES.items():
            dotted = name.replace("-idx", ".idx")
            candidates = [root / f"{n}{ext}" for n in (name, dotted) for ext in ("", ".gz")]
            match = next((c for c in candidates if c.is_file()), None)
            if match is not None:
                found[role] = match
        if len(found) == len(MNIST_FILES):
            return found
    return None
