"""Sample decoders: a raw webdataset sample (bytes per key) -> ``(input, target)`` tensors.

* images (MNIST, image folders): float32 ``[C, S, S]``, pixels scaled to [0, 1] and,
  when normalising, standardised with the training split's per-channel mean/std from
  ``index.json`` (Dynamic MNIST on the offline digits: mean ~0.034, std ~0.145; on real
  MNIST about 0.0145 / 0.111, i.e. MNIST's 0.1307 / 0.3081 diluted by the 84x84 canvas);
  target: int64 class index.
* text: a window of T+1 tokens -> ``input_ids`` = first T, ``targets`` = last T, int64.
* synthetic: the sample already holds both tensors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

DECODE_ERRORS = (KeyError, ValueError, OSError, EOFError, Image.DecompressionBombError)
"""What a corrupt or hostile sample raises while decoding (PIL's UnidentifiedImageError is an OSError;
its DecompressionBombError, for an image past twice ``Image.MAX_IMAGE_PIXELS``, is neither)."""


class Decoder(Protocol):
    def __call__(self, sample: dict[str, Any]) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class ImageDecoder:
    key: str
    mode: str
    size: int
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __call__(self, sample: dict[str, Any]) -> tuple[Tensor, Tensor]:
        label = int(sample["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} is outside the data set's {self.num_classes} classes "
                             f"(0..{self.num_classes - 1}, index.json num_classes)")
        with Image.open(io.BytesIO(sample[self.key])) as image:
            # The header's size, checked before any pixel is decoded: whatever PIL's own limit
            # (Image.MAX_IMAGE_PIXELS, which a library may lift), a decompression bomb is never inflated.
            if image.size != (self.size, self.size):
                raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected {self.size}x{self.size}")
            pixels = np.array(image.convert(self.mode), dtype=np.uint8)
        x = torch.from_numpy(pixels).float().div_(255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()
        if self.mean is not None and self.std is not None:
            x = (x - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)
        return x, torch.tensor(label, dtype=torch.int64)


@dataclass(frozen=True)
class TokenDecoder:
    window: int
    vocab_size: int

    def __call__(self, sample: dict[str, Any]) -> tuple[Tensor, Tensor]:
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        if tokens.shape != (self.window,):
            raise ValueError(f"window has shape {tokens.shape}, expected ({self.window},)")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids {tokens.min()}..{tokens.max()} are outside the data set's vocabulary "
                             f"(0..{self.vocab_size - 1}, index.json text.vocab_size)")
        ids = torch.from_numpy(tokens.astype(np.int64))
        return ids[:-1], ids[1:]


def synthetic_decoder(sample: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return sample["x"], sample["y"]


def decoder_for(index: dict[str, Any], *, normalize: bool) -> Decoder:
    """The decoder matching a shard index's kind."""
    if index["kind"] == "text":
        return TokenDecoder(index["text"]["window"], index["text"]["vocab_size"])
    image = index["image"]
    stats = (tuple(image["mean"]), tuple(image["std"])) if normalize else (None, None)
    return ImageDecoder(image["key"], image["mode"], image["size"], index["num_classes"], *stats)
