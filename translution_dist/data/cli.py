"""``translution data ...``: build and inspect shard sets.

``register(subparsers)`` adds the ``data`` command to the project's argparse CLI; each
subcommand sets ``args.func(args) -> int`` (the exit code). Bad input exits with
status 2 and a message naming the option at fault; builds write into a temporary
directory beside OUT, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from translution_dist.data.image_folder import build_image_folder_shards
from translution_dist.data.mnist import build_mnist_shards
from translution_dist.data.shards import BuildError, load_index, verify_shards
from translution_dist.data.text import build_text_shards


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _directory(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return Path(text)


def _file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return Path(text)


def _named_directory(text: str) -> tuple[str, Path]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (e.g. train=/data/imagenet/train), got {text!r}")
    if not name.isidentifier():
        raise argparse.ArgumentTypeError(f"split name {name!r} must be a word such as train or val")
    return name, _directory(directory)


def _option_name(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest:
            return "/".join(action.option_strings) or action.metavar or dest
    return dest


def _run(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    try:
        index = build(args)
    except BuildError as exc:
        parser.error(f"argument {_option_name(parser, exc.param)}: {exc.message}")
    splits = ", ".join(f"{s} {e['samples']} samples/{e['num_shards']} shards" for s, e in index["splits"].items())
    print(f"wrote {args.output}: {splits}")
    return 0


def _add_common(parser: argparse.ArgumentParser, samples_per_shard: int) -> None:
    parser.add_argument(
        "output", metavar="OUT", type=Path, help="directory to create (shards, index.json, DATACARD.md)"
    )
    parser.add_argument(
        "--samples-per-shard", type=_positive_int, default=samples_per_shard, help=f"(default {samples_per_shard})"
    )
    parser.add_argument("--seed", type=int, default=0, help="all randomness derives from it (default 0)")
    parser.add_argument("--force", dest="overwrite", action="store_true", help="replace OUT if it exists")


def _mnist(args: argparse.Namespace) -> dict[str, Any]:
    return build_mnist_shards(
        args.output,
        mode=args.mode,
        source=args.source,
        canvas_size=args.canvas_size,
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=True,
    )


def _text(args: argparse.Namespace) -> dict[str, Any]:
    return build_text_shards(
        args.input,
        args.output,
        context_length=args.context_length,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        test_fraction=args.test_fraction,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        suffix=args.suffix,
        overwrite=args.overwrite,
        progress=True,
    )


def _image_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    splits = dict(args.splits)
    if len(splits) != len(args.splits):
        parser.error("argument --split: each split name may be given once")
    return build_image_folder_shards(
        splits,
        args.output,
        image_size=args.image_size,
        image_format=args.image_format,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=True,
    )


def _inspect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        index = load_index(args.directory)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"argument DIR: {exc}")
    builder = index["builder"]
    print(f"{args.directory}: {index['kind']} shards by {builder['name']}")
    for name, value in builder["params"].items():
        print(f"  {name}: {value}")
    for name, split in index["splits"].items():
        print(f"split {name}: {split['samples']} samples in {split['num_shards']} shards")
    print(f"total: {index['total_samples']} samples in {index['total_shards']} shards")
    if args.no_verify:
        return 0
    problems = verify_shards(args.directory, index)
    for problem in problems:
        print(f"BAD {problem}")
    print(f"shards (checksum, sample count): {index['total_shards'] - len(problems)}/{index['total_shards']} OK"
          if not problems else f"{len(problems)} problem(s): rebuild the set with `translution data ...`")
    return 1 if problems else 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data`` (with ``mnist``, ``text``, ``image-folder``, ``inspect``) to a subparsers object."""
    data = subparsers.add_parser(
        "data",
        help="build and inspect webdataset shards",
        description="Build webdataset shard sets (with index.json and DATACARD.md) and verify them.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    mnist = commands.add_parser(
        "mnist",
        help="Dynamic/Static MNIST (84x84 canvas)",
        description="MNIST digits at random (dynamic) or centred (static) positions on an empty canvas, "
        "train and test splits. Without --source, an offline stand-in is built from scikit-learn's "
        "8x8 digits upscaled to 28x28 (DATACARD.md says so).",
    )
    _add_common(mnist, samples_per_shard=5000)
    mnist.add_argument("--mode", choices=("dynamic", "static"), default="dynamic", help="random or centred digits")
    mnist.add_argument(
        "--source", type=_directory, help="directory with the MNIST IDX files (default: offline scikit-learn digits)"
    )
    mnist.add_argument("--canvas-size", type=_positive_int, default=84, help="(default 84)")
    mnist.add_argument("--train-samples", type=_positive_int, help="default: every training digit once")
    mnist.add_argument("--test-samples", type=_positive_int, help="default: every test digit once")
    mnist.set_defaults(func=partial(_run, mnist, _mnist))

    text = commands.add_parser(
        "text",
        help="token windows from a folder of .txt files",
        description="Tokenise a folder of .txt documents (a byte-level BPE tokenizer trained locally, or "
        "--tokenizer) into windows of context-length + 1 tokens. For OpenWebText, extract its archives "
        "into one folder of .txt files and point INPUT at it.",
    )
    text.add_argument("input", metavar="INPUT", type=_directory,
                      help="folder of documents, one per file (searched recursively)")
    _add_common(text, samples_per_shard=10000)
    text.add_argument(
        "--context-length", type=_positive_int, required=True, help="tokens per input (windows hold one more)"
    )
    vocab = text.add_mutually_exclusive_group()
    vocab.add_argument(
        "--vocab-size", type=_positive_int, default=8192, help="train a BPE tokenizer of this size (default 8192)"
    )
    vocab.add_argument("--tokenizer", type=_file, help="use this tokenizer.json instead of training one")
    text.add_argument("--eos-token", default="<|endoftext|>", help="token appended to every document")
    text.add_argument("--suffix", default=".txt", help="documents are the files named *SUFFIX (default .txt; e.g. .md)")
    text.add_argument(
        "--test-fraction", type=_fraction, default=0.01, help="share of documents held out (default 0.01)"
    )
    text.set_defaults(func=partial(_run, text, _text))

    images = commands.add_parser(
        "image-folder",
        help="image folders (ImageNet layout)",
        description="Shards of <split dir>/<class>/*.jpg|png images, resized (shorter side) and centre-cropped "
        "to a square; class indices follow the sorted class names.",
    )
    _add_common(images, samples_per_shard=1000)
    images.add_argument(
        "--split",
        dest="splits",
        metavar="NAME=DIR",
        type=_named_directory,
        action="append",
        required=True,
        help="a split and its directory of <class>/ folders; repeat for more (e.g. train=... val=...)",
    )
    images.add_argument("--size", dest="image_size", type=_positive_int, default=224, help="square side (default 224)")
    images.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg", help="(default jpg)")
    images.add_argument("--workers", type=_positive_int, default=1, help="processes that resize images (default 1)")
    images.set_defaults(func=partial(_run, images, partial(_image_folder, images)))

    inspect = commands.add_parser("inspect", help="summarise index.json and verify shard checksums and sample counts")
    inspect.add_argument("directory", metavar="DIR", type=Path, help="a directory written by `translution data ...`")
    inspect.add_argument("--no-verify", action="store_true", help="skip reading the shards (checksums, counts)")
    inspect.set_defaults(func=partial(_inspect, inspect))
    return data


def main(argv: list[str] | None = None) -> int:
    """Run ``data`` commands without the full ``translution`` CLI (``python -m translution_dist.data.cli``)."""
    parser = argparse.ArgumentParser(prog="translution")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
