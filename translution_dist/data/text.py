"""Text shards: a folder of ``.txt`` documents (or another ``suffix``, e.g. ``.md``) -> packed windows of token ids.

Each file is one document. Documents are tokenised with a byte-level BPE tokenizer
(trained here on the training documents with HuggingFace ``tokenizers``, nothing
downloaded, or a ``tokenizer.json`` you supply), joined with an end-of-text token, and
cut into windows of ``context_length + 1`` tokens with stride ``context_length``: a
window is a model input (its first T tokens) plus the targets (its last T), and every
token of the stream is a target exactly once. Samples hold ``tokens.npy`` (uint16 when
the vocabulary fits, else int32); the tokenizer is saved beside the shards.

OpenWebText, the Translution paper's language-modelling corpus, is used the same way:
extract its archives (each ``urlsf_subset*.xz`` is a tar of ``.txt`` documents) into one
folder and point this builder at it, with GPT-2's ``tokenizer.json`` for the paper's
vocabulary::

    translution data text owt_txt/ data/owt --context-length 1024 --tokenizer gpt2/tokenizer.json
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from translution_dist.data.shards import (
    BuildError,
    SplitWriter,
    params_for_index,
    sha256_file,
    staged_output,
    write_datacard,
    write_index,
)

TOKENIZER_FILE = "tokenizer.json"
_ENCODE_BATCH = 256


def train_bpe_tokenizer(texts: Iterator[str], *, vocab_size: int, eos_token: str) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style: any byte sequence is encodable)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class WindowPacker:
    """Cuts a token stream into windows of ``length + 1`` tokens with stride ``length``."""

    def __init__(self, length: int) -> None:
        self.length = length
        self._pending = np.empty(0, np.int64)
        self.tokens = 0

    def add(self, ids: list[int]) -> Iterator[np.ndarray]:
        self.tokens += len(ids)
        stream = np.concatenate([self._pending, np.asarray(ids, np.int64)])
        starts = range(0, len(stream) - self.length, self.length)
        for start in starts:
            yield stream[start : start + self.length + 1]
        self._pending = stream[len(starts) * self.length :]

    @property
    def leftover(self) -> int:
        """Tokens of the incomplete last window (dropped)."""
        return len(self._pending)


def _draw(root: Path, path: Path, seed: int) -> float:
    """A document's stable draw in [0, 1): a hash of its relative path and the seed."""
    return random.Random(f"{seed}:{path.relative_to(root).as_posix()}").random()


def _walk(root: Path, suffix: str) -> Iterator[Path]:
    """Every file named ``*suffix`` under ``root``, in sorted-walk order (a generator: OpenWebText has millions)."""
    for directory, subdirectories, names in os.walk(root):
        subdirectories.sort()
        for name in sorted(n for n in names if n.endswith(suffix)):
            yield Path(directory) / name


def _documents(root: Path, *, seed: int, test_fraction: float, suffix: str,
               held_out: Path | None) -> Iterator[tuple[str, Path]]:
    """``(split, path)`` of every ``*suffix`` file under ``root``: ``test`` when its draw is below
    ``test_fraction``, and ``held_out`` (see :func:`_hold_out`) in any case."""
    for path in _walk(root, suffix):
        yield ("test" if path == held_out or _draw(root, path, seed) < test_fraction else "train"), path


def _hold_out(root: Path, *, seed: int, test_fraction: float, suffix: str) -> Path | None:
    """The document moved to ``test`` when the draws left it empty: the one of lowest draw, so that a small
    corpus still gets a test split (training evaluates on it). ``None`` when not needed or not possible
    (no test share asked for, or a single document, which training needs)."""
    count, lowest = 0, None
    for path in _walk(root, suffix):
        draw = _draw(root, path, seed)
        if draw < test_fraction:
            return None
        count += 1
        if lowest is None or draw < lowest[0]:
            lowest = (draw, path)
    return lowest[1] if test_fraction > 0 and count >= 2 and lowest is not None else None


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def build_text_shards(
    input: Path,
    output: Path,
    *,
    context_length: int,
    vocab_size: int = 8192,
    tokenizer: Path | None = None,
    eos_token: str = "<|endoftext|>",
    test_fraction: float = 0.01,
    samples_per_shard: int = 10000,
    seed: int = 0,
    suffix: str = ".txt",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenise every ``*suffix`` file under ``input`` into ``train``/``test`` window shards.

    A document goes to ``test`` with probability ``test_fraction``, decided by a hash of
    its relative path and the seed (stable when files are added); when that leaves ``test``
    empty, the document of lowest draw goes there, so that training can evaluate. The tokenizer, when
    trained here, sees only the training documents.
    """
    params = params_for_index(locals())
    input, output = Path(input), Path(output)
    if context_length < 1:
        raise BuildError("context_length", f"must be at least 1, got {context_length}")
    if not 0.0 <= test_fraction < 1.0:
        raise BuildError("test_fraction", f"must be in [0, 1), got {test_fraction}")
    if tokenizer is None and vocab_size < 257:
        raise BuildError("vocab_size", f"must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    if not input.is_dir():
        raise BuildError("input", f"{input} is not a directory")
    if not suffix:
        raise BuildError("suffix", "must not be empty; documents are files named *SUFFIX, e.g. .txt")
    if next(_walk(input, suffix), None) is None:
        raise BuildError("input", f"no {suffix} files under {input}")
    held_out = _hold_out(input, seed=seed, test_fraction=test_fraction, suffix=suffix)
    documents = partial(_documents, input, seed=seed, test_fraction=test_fraction, suffix=suffix, held_out=held_out)
    if all(split == "test" for split, _ in documents()):
        raise BuildError("test_fraction", f"left no training document under {input}; lower it")

    if tokenizer is not None:
        try:
            tok = Tokenizer.from_file(str(tokenizer))
        except Exception as exc:  # tokenizers raises its own exception type for any bad file
            raise BuildError("tokenizer", f"cannot load {tokenizer}: {exc}") from exc
    else:
        texts = (_read(path) for split, path in documents() if split == "train")
        tok = train_bpe_tokenizer(texts, vocab_size=vocab_size, eos_token=eos_token)
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise BuildError("eos_token", f"{eos_token!r} is not in the tokenizer's vocabulary; name its end-of-text token")
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.int32

    with staged_output(output, overwrite=overwrite) as staging:
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        else:
            tok.save(str(staging / TOKENIZER_FILE))
        writers = {s: SplitWriter(staging, s, samples_per_shard) for s in ("train", "test")}
        packers = {s: WindowPacker(context_length) for s in writers}
        windows = dict.fromkeys(writers, 0)
        counts = dict.fromkeys(writers, 0)
        bar = tqdm(desc="text", unit="doc", disable=None if progress else True)
        stream = documents()
        while batch := list(itertools.islice(stream, _ENCODE_BATCH)):
            texts = [_read(path) for _, path in batch]
            for (split, _), encoding in zip(batch, tok.encode_batch(texts, add_special_tokens=False)):
                counts[split] += 1
                for window in packers[split].add([*encoding.ids, eos_id]):
                    key = f"{split}-{windows[split]:09d}"
                    writers[split].write({"__key__": key, "tokens.npy": window.astype(dtype)})
                    windows[split] += 1
            bar.update(len(batch))
        bar.close()
        shards = {s: w.close() for s, w in writers.items()}
        if not windows["train"]:  # training would refuse to start
            raise BuildError("context_length", f"the {counts['train']} training document(s) hold "
                             f"{packers['train'].tokens} tokens, fewer than one window of {context_length + 1}: "
                             "lower it, or add documents")
        if test_fraction > 0 and not windows["test"]:  # training would refuse to evaluate on it
            if not counts["test"]:
                raise BuildError("test_fraction", "a corpus of one document leaves none to test on: add documents, "
                                 "or set it to 0 and train with train.eval_batches=0")
            raise BuildError("test_fraction", f"the {counts['test']} test document(s) hold {packers['test'].tokens} "
                             f"tokens, fewer than one window of {context_length + 1}, so the test split would be "
                             "empty: raise it, or lower the context length")
        extra = {
            "text": {
                "context_length": context_length,
                "window": context_length + 1,
                "stride": context_length,
                "vocab_size": vocab,
                "dtype": np.dtype(dtype).name,
                "eos_token": eos_token,
                "eos_id": eos_id,
                "tokenizer": TOKENIZER_FILE,
                "tokenizer_sha256": sha256_file(staging / TOKENIZER_FILE),
                "tokenizer_trained": tokenizer is None,
                "documents": counts,
                "tokens": {s: p.tokens for s, p in packers.items()},
                "dropped_tail_tokens": {s: p.leftover for s, p in packers.items()},
            }
        }
        index = write_index(
            staging,
            kind="text",
            builder="build_text_shards",
            params=params,
            splits=shards,
            sample_keys=["tokens.npy"],
            extra=extra,
        )
        write_datacard(staging, _datacard(index))
    return index


def _datacard(index: dict[str, Any]) -> str:
    p, t = index["builder"]["params"], index["text"]
    if t["tokenizer_trained"]:
        tokenizer = (
            f"A byte-level BPE tokenizer trained here on the training documents with HuggingFace "
            f"`tokenizers` (requested vocabulary {p['vocab_size']}, obtained {t['vocab_size']})."
        )
    else:
        tokenizer = f"Supplied by the user: `{p['tokenizer']}` (vocabulary {t['vocab_size']})."
    splits = "\n".join(
        f"| {s} | {t['documents'][s]} | {t['tokens'][s]} | {e['samples']} | {e['num_shards']} |"
        for s, e in index["splits"].items()
    )
    return f"""
# Text windows (context length {t["context_length"]})

Built by `translution_dist.data.text.build_text_shards` with seed {p["seed"]} from the
`{p.get("suffix", ".txt")}` files under `{p["input"]}` (one document per file).

## Provenance

The documents are whatever that folder held; record their origin and licence here. The
Translution paper trains language models on OpenWebText (Gokaslan & Cohen, 2019): extract
its `urlsf_subset*.xz` archives (tars of `.txt` documents) into one folder and build from
it, ideally with GPT-2's `tokenizer.json` (`--tokenizer`).

## Tokenizer

{tokenizer} Saved as `{t["tokenizer"]}` (sha256 `{t["tokenizer_sha256"]}`); end-of-text token
`{t["eos_token"]}` (id {t["eos_id"]}) follows every document.

## Windows

Documents go to `test` with probability {p["test_fraction"]} (hash of path and seed; at least one when
that leaves none and there are two or more). Each
split's token stream is cut into windows of {t["window"]} tokens with stride {t["stride"]}:
inputs are a window's first {t["context_length"]} tokens, targets its last
{t["context_length"]}. Stored as `tokens.npy` ({t["dtype"]}); the incomplete tail is dropped.

| split | documents | tokens | windows | shards |
| --- | --- | --- | --- | --- |
{splits}
"""
