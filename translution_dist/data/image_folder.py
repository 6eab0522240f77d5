"""Image-folder shards (ImageNet layout: ``<split dir>/<class>/**/*.jpg|png``).

Images are resized so the shorter side is ``image_size`` and centre-cropped to a square,
converted to RGB and re-encoded (``image.jpg`` or ``image.png``), with ``cls`` (class
index) and ``meta.json`` (path relative to the split directory). Class indices follow
the sorted union of class-directory names over all splits and are saved in
``index.json``. Unreadable files are skipped and listed there.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from translution_dist.data.shards import BuildError, SplitWriter, staged_output, write_datacard, write_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_Encoded = tuple[bytes, np.ndarray, np.ndarray] | None
_WINDOW = 4096
"""Images handed to the worker pool at a time, bounding the encoded images held in memory."""


def _square(path: Path, size: int, image_format: str) -> _Encoded:
    """Resize-and-crop one image; returns (encoded bytes, channel sums, channel sums of squares)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    pixels = np.asarray(image, np.float64) / 255.0
    buffer = io.BytesIO()
    options = {"quality": 95} if image_format == "jpg" else {}
    image.save(buffer, format="JPEG" if image_format == "jpg" else "PNG", **options)
    return buffer.getvalue(), pixels.sum(axis=(0, 1)), np.square(pixels).sum(axis=(0, 1))


def _square_task(task: tuple[Path, int, str]) -> _Encoded:
    return _square(*task)


@contextmanager
def _encoder(workers: int, size: int, image_format: str) -> Iterator[Callable[[list[Path]], list[_Encoded]]]:
    """Yield a function that squares a list of images, in ``workers`` processes when > 1."""
    if workers <= 1:
        yield lambda paths: [_square(p, size, image_format) for p in paths]
        return
    with ProcessPoolExecutor(workers) as pool:
        yield lambda paths: list(pool.map(_square_task, [(p, size, image_format) for p in paths], chunksize=32))


def _list_split(directory: Path, split: str) -> dict[str, list[Path]]:
    if not directory.is_dir():
        raise BuildError("splits", f"{split}={directory} is not a directory")
    classes = {}
    for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            classes[class_dir.name] = files
    if not classes:
        raise BuildError("splits", f"{split}={directory} has no <class>/ subdirectories with images")
    return classes


def build_image_folder_shards(
    splits: dict[str, Path],
    output: Path,
    *,
    image_size: int = 224,
    image_format: Literal["jpg", "png"] = "jpg",
    samples_per_shard: int = 1000,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write one shard series per named split (e.g. ``{"train": ..., "val": ...}``).

    Samples are written in a seeded random order so that shards mix classes. The
    normalisation statistics come from the ``train`` split (else the first one).
    ``workers`` processes decode and resize in parallel; the output does not depend on it.
    """
    if not splits:
        raise BuildError("splits", "name at least one split, e.g. train=/data/imagenet/train")
    if image_size < 1:
        raise BuildError("image_size", f"must be at least 1, got {image_size}")
    if image_format not in ("jpg", "png"):
        raise BuildError("image_format", f"must be 'jpg' or 'png', got {image_format!r}")
    listed = {name: _list_split(Path(d), name) for name, d in splits.items()}
    classes = sorted({c for split in listed.values() for c in split})
    class_index = {c: i for i, c in enumerate(classes)}
    stats_split = "train" if "train" in listed else next(iter(listed))
    key = f"image.{image_format}"
    params = {
        "splits": {name: str(d) for name, d in splits.items()},
        "image_size": image_size,
        "image_format": image_format,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
    }
    with staged_output(output, overwrite=overwrite) as staging, _encoder(workers, image_size, image_format) as encode:
        shards, skipped = {}, []
        sums, squares, count = np.zeros(3), np.zeros(3), 0
        total = sum(len(f) for split in listed.values() for f in split.values())
        bar = tqdm(total=total, desc="images", unit="img", disable=None if progress else True)
        for split_id, (split, by_class) in enumerate(listed.items()):
            root = Path(splits[split])
            items = [(path, class_index[c]) for c, files in by_class.items() for path in files]
            random.Random(f"{seed}:{split_id}").shuffle(items)
            writer = SplitWriter(staging, split, samples_per_shard)
            written = 0
            for start in range(0, len(items), _WINDOW):
                window = items[start : start + _WINDOW]
                for (path, label), encoded in zip(window, encode([p for p, _ in window])):
                    bar.update()
                    relative = path.relative_to(root).as_posix()
                    if encoded is None:
                        skipped.append(f"{split}/{relative}")
                        continue
                    data, channel_sum, channel_sq = encoded
                    if split == stats_split:
                        sums, squares, count = sums + channel_sum, squares + channel_sq, count + image_size**2
                    meta = json.dumps({"path": relative})
                    writer.write({"__key__": f"{split}-{written:08d}", key: data, "cls": label, "meta.json": meta})
                    written += 1
            shards[split] = writer.close()
        bar.close()
        if count == 0:
            raise BuildError("splits", f"no readable image in split {stats_split!r}")
        mean = sums / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        extra = {
            "image": {"key": key, "mode": "RGB", "size": image_size, "mean": mean.tolist(), "std": std.tolist()},
            "num_classes": len(classes),
            "classes": classes,
            "skipped_files": skipped,
        }
        index = write_index(
            staging,
            kind="image_folder",
            builder="build_image_folder_shards",
            params=params,
            splits=shards,
            sample_keys=[key, "cls", "meta.json"],
            extra=extra,
        )
        write_datacard(staging, _datacard(index, stats_split))
    return index


def _datacard(index: dict[str, Any], stats_split: str) -> str:
    p, image = index["builder"]["params"], index["image"]
    rows = "\n".join(
        f"| {s} | `{p['splits'][s]}` | {e['samples']} | {e['num_shards']} |" for s, e in index["splits"].items()
    )
    mean = ", ".join(f"{m:.4f}" for m in image["mean"])
    std = ", ".join(f"{s:.4f}" for s in image["std"])
    return f"""
# Image folder ({image["size"]}x{image["size"]}, {index["num_classes"]} classes)

Built by `translution_dist.data.image_folder.build_image_folder_shards` with seed {p["seed"]}.

## Provenance

| split | source directory | samples | shards |
| --- | --- | --- | --- |
{rows}

Record the origin and licence of these images here (ImageNet, for instance, is for
non-commercial research under its terms of access).

## Processing

Shorter side resized to {image["size"]} (bicubic), centre crop, RGB, stored as
`{image["key"]}`. Classes are the sorted directory names (`classes` in `index.json`).
{len(index["skipped_files"])} unreadable file(s) were skipped (`skipped_files`).
Normalisation statistics of `{stats_split}` (per channel, pixels in [0, 1]):
mean ({mean}), std ({std}).
"""
