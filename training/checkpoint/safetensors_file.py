"""A safetensors file written as its tensors arrive, atomically.

``safetensors.torch.save_file`` needs every tensor in memory at once; the format itself
does not (an 8-byte header length, a JSON header of names, dtypes, shapes and byte
offsets, then the raw little-endian bytes), so with the shapes known up front the header
is written first and each tensor is appended and dropped. The file appears under its name
only when complete (temporary file in the same directory, fsync, rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorEntry:
    """What the header says of one tensor, before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        if entry.dtype not in DTYPE_NAMES:
            raise ValueError(f"{entry.name}: dtype {entry.dtype} has no safetensors name")
        header[entry.name] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    return len(encoded).to_bytes(8, "little") + encoded


def write_safetensors(path: Path, entries: list[TensorEntry], tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str]) -> None:
    """Write ``tensors`` (yielded in the order of ``entries``, matching them) to ``path``.

    Raises ``OSError`` if the file cannot be created, before any tensor is asked for; on any
    failure the temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("xb") as f:
        try:
            f.write(_header(entries, metadata))
            expected = iter(entries)
            for name, tensor in tensors:
                entry = next(expected, None)
                if entry is None or (name, tuple(tensor.shape), tensor.dtype) != (entry.name, entry.shape, entry.dtype):
                    raise AssertionError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the "
                                         f"header's next entry {entry}")
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if next(expected, None) is not None:
                raise AssertionError("fewer tensors than header entries")
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
