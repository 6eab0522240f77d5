"""Writing shard sets: numbered tar shards per split, ``index.json`` and ``DATACARD.md``.

Every builder writes into a temporary directory beside its target and renames it at the
end, so an interrupted or failed build never leaves a half-written data set. Tar members
get a fixed mtime, so the same inputs and seed give byte-identical shards (and checksums).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

INDEX_FILE = "index.json"
DATACARD_FILE = "DATACARD.md"
INDEX_FORMAT = "translution-dist-shards"
INDEX_VERSION = 1


class BuildError(ValueError):
    """Bad input to a builder; ``param`` names the builder argument at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SplitWriter:
    """Writes one split's samples into ``{prefix}-{000000..}.tar`` shards of fixed size."""

    def __init__(self, directory: Path, prefix: str, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise BuildError("samples_per_shard", f"must be at least 1, got {samples_per_shard}")
        self.directory = directory
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def write(self, sample: Mapping[str, Any]) -> None:
        """Write one sample (webdataset encodes values by key extension)."""
        if self._tar is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._tar = wds.TarWriter(str(self.directory / name), mtime=0)
            self.shards.append({"file": name, "samples": 0, "sha256": ""})
        self._tar.write(dict(sample))
        self._count += 1
        if self._count == self.samples_per_shard:
            self._close_shard()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard and return one ``{file, samples, sha256}`` record per shard."""
        self._close_shard()
        return self.shards

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        record = self.shards[-1]
        record["samples"] = self._count
        record["sha256"] = sha256_file(self.directory / record["file"])
        self._tar, self._count = None, 0


@contextmanager
def staged_output(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    On failure nothing is left behind: neither the staging directory nor parent
    directories that this call created.
    """
    target = Path(target).absolute()
    if target.exists():
        if not target.is_dir():
            raise BuildError("output", f"{target} is a file, not a directory")
        if any(target.iterdir()) and not overwrite:
            raise BuildError(
                "output",
                f"{target} already exists and is not empty; choose another path or allow overwriting it (--force)",
            )
    created = next((p for p in reversed(target.parents) if not p.exists()), None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the data set is not
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(created or staging, ignore_errors=True)
        raise


def write_index(
    directory: Path,
    *,
    kind: str,
    builder: str,
    params: Mapping[str, Any],
    splits: Mapping[str, list[dict[str, Any]]],
    sample_keys: list[str],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Write ``index.json`` (per-shard counts and checksums, totals, builder parameters)."""
    split_entries = {
        name: {"samples": sum(s["samples"] for s in shards), "num_shards": len(shards), "shards": shards}
        for name, shards in splits.items()
    }
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "kind": kind,
        "builder": {"name": builder, "params": dict(params)},
        "sample_keys": sample_keys,
        **extra,
        "splits": split_entries,
        "total_samples": sum(s["samples"] for s in split_entries.values()),
        "total_shards": sum(s["num_shards"] for s in split_entries.values()),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_datacard(directory: Path, text: str) -> None:
    (directory / DATACARD_FILE).write_text(text.strip() + "\n")


def load_index(directory: Path) -> dict[str, Any]:
    """Read and sanity-check ``index.json``; errors say how to make one."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {INDEX_FILE} in {directory}: point data.path at a directory written by `translution data ...`"
        )
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path} is not a {INDEX_FORMAT} v{INDEX_VERSION} index")
    return index


def count_samples(path: Path) -> int:
    """The samples a shard holds, grouped by key as the readers group them; raises on a corrupt tar."""
    with open(path, "rb") as stream:
        members = tar_file_expander([{"url": str(path), "stream": stream}])
        return sum(1 for _ in group_by_keys(members))


def verify_shards(directory: Path, index: Mapping[str, Any]) -> list[str]:
    """Return one message per missing shard, checksum mismatch or sample count that ``index.json`` misstates
    (empty: all good). The counts are read from the shards themselves, so an index edited or written by
    another tool, whose checksums still match, cannot over-claim samples that training would miss."""
    problems = []
    for name, split in index["splits"].items():
        for shard in split["shards"]:
            path = Path(directory) / shard["file"]
            if not path.is_file():
                problems.append(f"{shard['file']}: missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 mismatch (file changed or truncated)")
                continue
            try:
                held = count_samples(path)
            except (OSError, EOFError, tarfile.TarError, ValueError, zlib.error) as exc:
                problems.append(f"{shard['file']}: unreadable ({type(exc).__name__}: {exc})")
                continue
            if held != shard["samples"]:
                problems.append(f"{shard['file']}: holds {held} samples, index.json says {shard['samples']}")
        listed = sum(s["samples"] for s in split["shards"])
        if split["samples"] != listed:
            problems.append(f"split {name}: index.json says {split['samples']} samples, its shards list {listed}")
    return problems


def params_for_index(params: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments that shape a builder's output, as JSON values (paths become strings)."""
    skip = {"output", "overwrite", "progress"}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items() if k not in skip}
