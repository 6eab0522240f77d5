"""Text shards: a tokenizer trained locally, windows of context_length + 1 tokens, reading them back."""

from __future__ import annotations

import io
import itertools
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from translution_dist.data import BuildError, DataConfig, build_dataloader, build_text_shards, load_index
from translution_dist.data.text import WindowPacker, train_bpe_tokenizer

WORDS = ["attention", "displacement", "translution", "relative", "query", "key", "value", "token", "window", "rank"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(12):
        folder = root / ("nested" if i % 3 == 0 else "")
        folder.mkdir(exist_ok=True)
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)) + "\n")
    (root / "notes.md").write_text("not a .txt file")
    return root


def read_windows(directory: Path, split: str) -> list[np.ndarray]:
    windows = []
    for shard in load_index(directory)["splits"][split]["shards"]:
        with tarfile.open(directory / shard["file"]) as tar:
            windows += [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar]
    return windows


def test_window_packer_makes_every_token_a_target_once():
    packer = WindowPacker(4)
    windows = [w for chunk in ([0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10]) for w in packer.add(chunk)]
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert packer.leftover == 3  # tokens 8, 9, 10: no full window


def test_local_tokenizer_and_windows(corpus, tmp_path):
    out = tmp_path / "text"
    index = build_text_shards(corpus, out, context_length=16, vocab_size=300, test_fraction=0.25, samples_per_shard=40)
    text = index["text"]
    assert text["documents"]["train"] + text["documents"]["test"] == 12
    assert text["documents"]["test"] > 0 and text["dtype"] == "uint16"
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == text["vocab_size"] <= 300
    assert tokenizer.decode(tokenizer.encode("translution attention").ids) == "translution attention"
    windows = read_windows(out, "train")
    assert len(windows) == index["splits"]["train"]["samples"] > 0
    assert all(w.shape == (17,) and w.dtype == np.uint16 for w in windows)
    assert all(a[-1] == b[0] for a, b in itertools.pairwise(windows)), "stride 16: last token starts the next window"
    assert (text["tokens"]["train"] - 1) // 16 == len(windows)
    assert np.concatenate(windows).max() < text["vocab_size"] and text["eos_id"] in np.concatenate(windows)
    again = build_text_shards(
        corpus, tmp_path / "again", context_length=16, vocab_size=300, test_fraction=0.25, samples_per_shard=40
    )
    assert again["splits"] == index["splits"] and again["text"]["tokenizer_sha256"] == text["tokenizer_sha256"]
    assert "OpenWebText" in (out / "DATACARD.md").read_text()

    reused = build_text_shards(
        corpus, tmp_path / "reused", context_length=8, tokenizer=out / "tokenizer.json", test_fraction=0.25
    )
    assert reused["text"]["tokenizer_sha256"] == text["tokenizer_sha256"] and not reused["text"]["tokenizer_trained"]

    loader, _ = build_dataloader(
        DataConfig(kind="text", path=out), split="train", dp_rank=0, dp_size=1, batch_size=4, seed=0
    )
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert loader.info.vocab_size == text["vocab_size"] and loader.info.input_shape == (16,)


def test_documents_of_another_suffix(corpus, tmp_path):
    """``--suffix .md`` reads the Markdown files instead of the .txt ones (how the README builds a set from docs/)."""
    from translution_dist.data.cli import main

    assert main(["data", "text", str(corpus), str(tmp_path / "md"), "--context-length", "2", "--vocab-size", "270",
                 "--suffix", ".md", "--test-fraction", "0"]) == 0  # one document: nothing to hold out for test
    index = load_index(tmp_path / "md")
    assert index["text"]["documents"] == {"train": 1, "test": 0} and index["builder"]["params"]["suffix"] == ".md"
    assert "`.md` files under" in (tmp_path / "md" / "DATACARD.md").read_text()
    with pytest.raises(BuildError) as error:
        build_text_shards(corpus, tmp_path / "out", context_length=2, suffix="")
    assert error.value.param == "suffix" and not (tmp_path / "out").exists()


def test_text_builder_errors_name_the_parameter(corpus, tmp_path):
    tokenizer = train_bpe_tokenizer(iter(["a b c"]), vocab_size=260, eos_token="<|endoftext|>")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "broken.json").write_text("{")
    cases = [
        (dict(input=tmp_path / "missing", context_length=8), "input"),
        (dict(input=tmp_path, context_length=8), "input"),  # no .txt files
        (dict(input=corpus, context_length=8, vocab_size=200), "vocab_size"),
        (dict(input=corpus, context_length=8, tokenizer=tmp_path / "tokenizer.json", eos_token="<eos>"), "eos_token"),
        (dict(input=corpus, context_length=8, tokenizer=tmp_path / "broken.json"), "tokenizer"),
        (dict(input=corpus, context_length=8, test_fraction=1.0), "test_fraction"),
    ]
    for kwargs, param in cases:
        with pytest.raises(BuildError) as error:
            build_text_shards(output=tmp_path / "out", **kwargs)
        assert error.value.param == param
        assert not (tmp_path / "out").exists()


def _small_corpus(root: Path, words_per_document: list[int]) -> Path:
    """Documents of these lengths in words, the first given to the document of lowest draw (the one held out)."""
    root.mkdir()
    names = sorted((f"doc{i}.txt" for i in range(len(words_per_document))),
                   key=lambda name: random.Random(f"0:{name}").random())  # build_text_shards' draw at seed 0
    rng = random.Random(1)
    for name, n in zip(names, words_per_document):
        (root / name).write_text(" ".join(rng.choice(WORDS) for _ in range(n)))
    return root


def test_a_small_corpus_still_gets_a_test_split(tmp_path):
    """At the default test_fraction 0.01 five documents draw no test document; the lowest draw is held out."""
    corpus = _small_corpus(tmp_path / "docs", [200] * 5)
    index = build_text_shards(corpus, tmp_path / "out", context_length=16, vocab_size=300)
    assert index["text"]["documents"] == {"train": 4, "test": 1}
    assert index["splits"]["test"]["samples"] > 0 and index["splits"]["train"]["samples"] > 0
    again = build_text_shards(corpus, tmp_path / "again", context_length=16, vocab_size=300)
    assert again["splits"] == index["splits"]  # the same document, every time
    loader, _ = build_dataloader(DataConfig(kind="text", path=tmp_path / "out"), split="test", dp_rank=0, dp_size=1,
                                 batch_size=2, seed=0)
    assert len(loader) > 0
    none_asked = build_text_shards(corpus, tmp_path / "none", context_length=16, vocab_size=300, test_fraction=0.0)
    assert none_asked["text"]["documents"] == {"train": 5, "test": 0}


@pytest.mark.parametrize(("words", "param", "message"), [
    ([3, 200, 200], "test_fraction", "fewer than one window of 17"),  # the held-out document is too short
    ([200], "test_fraction", "a corpus of one document leaves none to test on"),
    ([3, 3, 3], "context_length", "training document(s) hold"),
])
def test_an_empty_split_is_refused_at_build_time(tmp_path, words, param, message):
    corpus = _small_corpus(tmp_path / "docs", words)
    with pytest.raises(BuildError) as error:
        build_text_shards(corpus, tmp_path / "out", context_length=16, vocab_size=300)
    assert error.value.param == param and message in error.value.message
    assert not (tmp_path / "out").exists()
