"""Shard builders: counts, checksums, placement of MNIST digits, determinism, IDX input, image folders."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from translution_dist.data import (
    BuildError,
    DataConfig,
    build_dataloader,
    build_image_folder_shards,
    build_mnist_shards,
    load_index,
    verify_shards,
)
from translution_dist.data import shards as shards_module
from translution_dist.data.idx import find_mnist_files, read_idx
from translution_dist.data.mnist import _placements, load_sklearn_digits
from translution_dist.data.shards import sha256_file


def read_samples(path: Path) -> list[dict[str, bytes]]:
    """Group a tar shard's members by key, without the library under test."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def all_samples(directory: Path, split: str) -> list[dict[str, bytes]]:
    index = load_index(directory)
    return [s for shard in index["splits"][split]["shards"] for s in read_samples(directory / shard["file"])]


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mnist") / "dynamic"
    build_mnist_shards(out, train_samples=120, test_samples=40, samples_per_shard=50, seed=3)
    return out


def test_mnist_index_counts_and_checksums(dynamic):
    index = load_index(dynamic)
    assert index["kind"] == "mnist"
    assert [s["samples"] for s in index["splits"]["train"]["shards"]] == [50, 50, 20]
    assert index["splits"]["test"]["samples"] == 40
    assert index["total_samples"] == 160 and index["total_shards"] == 4
    assert index["builder"]["params"]["seed"] == 3
    for split in index["splits"].values():
        for shard in split["shards"]:
            assert shard["sha256"] == sha256_file(dynamic / shard["file"])
            assert len(read_samples(dynamic / shard["file"])) == shard["samples"]
    assert verify_shards(dynamic, index) == []
    assert "Not the real MNIST" in (dynamic / "DATACARD.md").read_text()


def test_dynamic_digits_sit_at_random_positions(dynamic):
    digits = load_sklearn_digits().splits["train"]
    corners = set()
    for sample in all_samples(dynamic, "train"):
        meta = json.loads(sample["meta.json"])
        canvas = np.array(Image.open(io.BytesIO(sample["image.png"])))
        assert canvas.shape == (84, 84) and canvas.dtype == np.uint8
        x, y = meta["x"], meta["y"]
        assert 0 <= x <= 56 and 0 <= y <= 56
        position = int(np.flatnonzero(digits[2] == meta["index"])[0])
        patch = canvas[y : y + 28, x : x + 28].copy()
        np.testing.assert_array_equal(patch, digits[0][position])
        assert int(sample["cls"]) == digits[1][position]
        canvas[y : y + 28, x : x + 28] = 0
        assert not canvas.any(), "pixels outside the digit's box"
        corners.add((x, y))
    assert len(corners) > 100  # 120 samples over 57 x 57 positions


def test_static_digits_are_centred_and_builds_are_deterministic(tmp_path, dynamic):
    build_mnist_shards(tmp_path / "a", mode="static", train_samples=30, test_samples=10, seed=1)
    build_mnist_shards(tmp_path / "b", mode="static", train_samples=30, test_samples=10, seed=1)
    build_mnist_shards(tmp_path / "c", mode="static", train_samples=30, test_samples=10, seed=2)
    for sample in all_samples(tmp_path / "a", "train"):
        meta = json.loads(sample["meta.json"])
        assert (meta["x"], meta["y"]) == (28, 28)
    checksums = [
        [s["sha256"] for split in load_index(tmp_path / d)["splits"].values() for s in split["shards"]] for d in "abc"
    ]
    assert checksums[0] == checksums[1]
    assert checksums[0] != checksums[2]
    again = build_mnist_shards(tmp_path / "d", train_samples=120, test_samples=40, samples_per_shard=50, seed=3)
    assert again["splits"] == load_index(dynamic)["splits"]


def test_repeated_digits_get_new_permutations_and_positions():
    placements = list(_placements(7, 3, 84, 28, True, np.random.default_rng(0)))
    sources = [p[0] for p in placements]
    assert sorted(sources[:3]) == [0, 1, 2] and sorted(sources[3:6]) == [0, 1, 2] and len(sources) == 7
    assert len({p[1:] for p in placements}) > 1


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte", np.arange(5))
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([7, 8, 9]))
    return root


def test_idx_reader_and_real_mnist_source(idx_dir, tmp_path):
    images = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz").tolist() == [7, 8, 9]
    index = build_mnist_shards(tmp_path / "out", source=idx_dir, mode="static")
    assert index["mnist"]["source"] == "mnist-idx"
    assert (index["splits"]["train"]["samples"], index["splits"]["test"]["samples"]) == (5, 3)
    card = (tmp_path / "out" / "DATACARD.md").read_text()
    assert "Real MNIST" in card and "train-images-idx3-ubyte.gz" in card
    for sample in all_samples(tmp_path / "out", "train"):
        meta = json.loads(sample["meta.json"])
        canvas = np.array(Image.open(io.BytesIO(sample["image.png"])))
        np.testing.assert_array_equal(canvas[28:56, 28:56], images[meta["index"]])


def test_idx_reader_rejects_bad_files(tmp_path, idx_dir):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    short = tmp_path / "short"
    short.write_bytes((idx_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    short.write_bytes(gzip.decompress(short.read_bytes())[:-1])
    with pytest.raises(ValueError, match="needs"):
        read_idx(short)
    torchvision_layout = tmp_path / "tv"
    (torchvision_layout / "MNIST").mkdir(parents=True)
    idx_dir.rename(torchvision_layout / "MNIST" / "raw")
    assert find_mnist_files(torchvision_layout)["train_images"].name == "train-images-idx3-ubyte.gz"
    with pytest.raises(BuildError) as error:
        build_mnist_shards(tmp_path / "out", source=tmp_path)
    assert error.value.param == "source"
    assert not (tmp_path / "out").exists()


def test_image_folder_shards(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("zebra", "ant"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                shape = (20 + 5 * i, 33, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "ant" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "shards"
    splits = {"train": tmp_path / "train", "val": tmp_path / "val"}
    index = build_image_folder_shards(splits, out, image_size=16, samples_per_shard=3)
    assert index["classes"] == ["ant", "zebra"] and index["num_classes"] == 2
    assert index["skipped_files"] == ["train/ant/broken.jpg"]
    assert [s["samples"] for s in index["splits"]["train"]["shards"]] == [3, 3, 2]
    assert index["splits"]["val"]["samples"] == 4
    for sample in all_samples(out, "train"):
        image = Image.open(io.BytesIO(sample["image.jpg"]))
        assert image.size == (16, 16) and image.mode == "RGB"
        assert index["classes"][int(sample["cls"])] == json.loads(sample["meta.json"])["path"].split("/")[0]
    assert len(index["image"]["mean"]) == 3 and verify_shards(out, index) == []
    loader, _ = build_dataloader(
        DataConfig(kind="image_folder", path=out), split="val", dp_rank=0, dp_size=1, batch_size=2, seed=0
    )
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert loader.info.num_classes == 2 and loader.info.input_shape == (3, 16, 16)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "new" / "deeper" / "out"

    def fail(self, sample):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards_module.SplitWriter, "write", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_mnist_shards(target, train_samples=5, test_samples=5)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwritten(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(BuildError) as error:
        build_mnist_shards(target, train_samples=5, test_samples=5)
    assert error.value.param == "output" and (target / "keep.txt").read_text() == "mine"
    build_mnist_shards(target, train_samples=5, test_samples=5, overwrite=True)
    assert not (target / "keep.txt").exists() and load_index(target)["total_samples"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
