"""Dynamic and Static MNIST shards, as in the Translution paper.

Each 28x28 digit is pasted into an empty 84x84 canvas: at a random position (dynamic,
the positional-shift benchmark) or at the centre (static). Digits come from the real
MNIST IDX files when a directory holding them is given; without one (no network here)
an offline stand-in is built from scikit-learn's bundled 8x8 digits, upscaled to 28x28
with bilinear interpolation, and the data card says so.

Samples: ``image.png`` (uint8 grayscale canvas), ``cls`` (label), ``meta.json`` (source
index and the digit's top-left corner ``x``, ``y`` on the canvas).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from translution_dist.data.idx import MNIST_FILES, find_mnist_files, read_idx
from translution_dist.data.shards import (
    BuildError,
    SplitWriter,
    params_for_index,
    sha256_file,
    staged_output,
    write_datacard,
    write_index,
)

SKLEARN_TEST_SIZE = 300
"""Digits of scikit-learn's 1797 held out for the offline ``test`` split (stratified, fixed)."""


@dataclass(frozen=True)
class DigitSource:
    """Per split: digits, labels and each digit's index in the original data; provenance."""

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    provenance: str


def load_idx_digits(directory: Path) -> DigitSource:
    """The real MNIST from its four IDX files in ``directory``."""
    files = find_mnist_files(directory)
    if files is None:
        names = ", ".join(f"{n}[.gz]" for n in MNIST_FILES.values())
        raise BuildError("source", f"{directory} does not hold the MNIST IDX files ({names})")
    try:
        arrays = {role: read_idx(path) for role, path in files.items()}
    except ValueError as exc:
        raise BuildError("source", str(exc)) from exc
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise BuildError(
                "source", f"{split} IDX files hold images {images.shape} {images.dtype} and labels {labels.shape}"
            )
        splits[split] = (images, labels.astype(np.int64), np.arange(len(labels)))
    checksums = "\n".join(f"  - `{p.name}` sha256 `{sha256_file(p)}`" for p in files.values())
    provenance = (
        f"Real MNIST (LeCun, Cortes & Burges), read from the IDX files in `{directory}`:\n{checksums}\n"
        "MNIST is distributed under CC BY-SA 3.0."
    )
    return DigitSource("mnist-idx", splits, provenance)


def load_sklearn_digits() -> DigitSource:
    """Offline stand-in: scikit-learn's 8x8 digits upscaled to 28x28, fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(d).resize((28, 28), Image.Resampling.BILINEAR)) for d in small])
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=SKLEARN_TEST_SIZE, stratify=labels, random_state=0)
    splits = {}
    for name, ids in (("train", np.sort(train)), ("test", np.sort(test))):
        splits[name] = (images[ids], labels[ids], ids)
    provenance = (
        "**Not the real MNIST.** No MNIST files were given, so this offline stand-in was built from "
        f"scikit-learn's bundled digits (`sklearn.datasets.load_digits`, {len(labels)} 8x8 images with "
        "values 0..16, from the UCI Optical Recognition of Handwritten Digits data set, CC BY 4.0). "
        "Each digit was scaled to 0..255 and upscaled to 28x28 with bilinear interpolation. "
        f"`test` holds {SKLEARN_TEST_SIZE} digits picked by `train_test_split(stratify=labels, "
        "random_state=0)`, `train` the rest; `meta.json` keeps each sample's index into "
        "`load_digits()`. Accuracies on this set are "
        "not comparable with MNIST results; pass `--source DIR` with the MNIST IDX files for those."
    )
    return DigitSource("sklearn-digits", splits, provenance)


def _placements(
    count: int, available: int, canvas: int, digit: int, dynamic: bool, rng: np.random.Generator
) -> Iterator[tuple[int, int, int]]:
    """(source index, x, y): passes over a fresh permutation of the digits, each placed anew."""
    for start in range(0, count, available):
        order = rng.permutation(available)
        if dynamic:
            corners = rng.integers(0, canvas - digit + 1, size=(available, 2))
        else:
            corners = np.full((available, 2), (canvas - digit) // 2)
        for j in range(min(available, count - start)):
            yield int(order[j]), int(corners[j, 0]), int(corners[j, 1])


def build_mnist_shards(
    output: Path,
    *,
    mode: Literal["dynamic", "static"] = "dynamic",
    source: Path | None = None,
    canvas_size: int = 84,
    train_samples: int | None = None,
    test_samples: int | None = None,
    samples_per_shard: int = 5000,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write Dynamic/Static MNIST shards for ``train`` and ``test``; return the index.

    ``train_samples``/``test_samples`` default to every available digit once; larger
    counts repeat digits with new placements. The output is a pure function of the
    arguments: the same seed gives byte-identical shards.
    """
    params = params_for_index(locals())
    if mode not in ("dynamic", "static"):
        raise BuildError("mode", f"must be 'dynamic' or 'static', got {mode!r}")
    for name, value in (("train_samples", train_samples), ("test_samples", test_samples)):
        if value is not None and value < 1:
            raise BuildError(name, f"must be at least 1, got {value}")
    digits = load_idx_digits(source) if source is not None else load_sklearn_digits()
    digit_size = digits.splits["train"][0].shape[1]
    if canvas_size < digit_size:
        raise BuildError("canvas_size", f"must be at least the digit size {digit_size}, got {canvas_size}")
    counts = {
        "train": train_samples or len(digits.splits["train"][1]),
        "test": test_samples or len(digits.splits["test"][1]),
    }
    with staged_output(output, overwrite=overwrite) as staging:
        shards = {}
        pixel_sum = pixel_sq = 0.0
        bar = tqdm(total=sum(counts.values()), desc="mnist", unit="img", disable=None if progress else True)
        for split_id, (split, count) in enumerate(counts.items()):
            images, labels, ids = digits.splits[split]
            rng = np.random.default_rng([seed, split_id])
            writer = SplitWriter(staging, split, samples_per_shard)
            placements = _placements(count, len(labels), canvas_size, digit_size, mode == "dynamic", rng)
            for i, (src, x, y) in enumerate(placements):
                canvas = np.zeros((canvas_size, canvas_size), np.uint8)
                canvas[y : y + digit_size, x : x + digit_size] = images[src]
                if split == "train":
                    pixels = images[src].astype(np.float64) / 255.0
                    pixel_sum += pixels.sum()
                    pixel_sq += np.square(pixels).sum()
                meta = {"source": digits.name, "index": int(ids[src]), "x": x, "y": y}
                writer.write(
                    {"__key__": f"{split}-{i:08d}", "image.png": canvas, "cls": int(labels[src]), "meta.json": meta}
                )
                bar.update()
            shards[split] = writer.close()
        bar.close()
        pixels_total = counts["train"] * canvas_size**2
        mean = pixel_sum / pixels_total
        std = math.sqrt(max(pixel_sq / pixels_total - mean * mean, 0.0))
        extra = {
            "image": {"key": "image.png", "mode": "L", "size": canvas_size, "mean": [mean], "std": [std]},
            "num_classes": 10,
            "classes": [str(d) for d in range(10)],
            "mnist": {"mode": mode, "source": digits.name, "digit_size": digit_size},
        }
        index = write_index(
            staging,
            kind="mnist",
            builder="build_mnist_shards",
            params=params,
            splits=shards,
            sample_keys=["image.png", "cls", "meta.json"],
            extra=extra,
        )
        write_datacard(staging, _datacard(digits, index))
    return index


def _datacard(digits: DigitSource, index: dict[str, Any]) -> str:
    p = index["builder"]["params"]
    image = index["image"]
    where = "a uniformly random position" if p["mode"] == "dynamic" else "the centre"
    splits = "\n".join(f"| {name} | {s['samples']} | {s['num_shards']} |" for name, s in index["splits"].items())
    return f"""
# {p["mode"].capitalize()} MNIST ({image["size"]}x{image["size"]})

Built by `translution_dist.data.mnist.build_mnist_shards` with seed {p["seed"]}.

## Source

{digits.provenance}

## Construction

Each {index["mnist"]["digit_size"]}x{index["mnist"]["digit_size"]} digit is pasted into an empty
{image["size"]}x{image["size"]} canvas at {where} (the Translution paper's
{p["mode"]} MNIST). Every pass over a split draws a new permutation of its digits (and new
positions); splits with more samples than digits repeat digits in later passes.
`meta.json` records the source index and the digit's top-left corner (`x`, `y`).

| split | samples | shards |
| --- | --- | --- |
{splits}

## Normalisation

Readers scale pixels to [0, 1] and then normalise with the training split's statistics:
mean {image["mean"][0]:.6f}, std {image["std"][0]:.6f} (over all canvas pixels; a canvas is
mostly background, so these are far below MNIST's 0.1307/0.3081).
"""
