"""``translution generate RUN --prompt TEXT``: sample text from a trained GPT, on the CPU, in one process.

RUN is a run directory (its newest good checkpoint is used), its ``checkpoints/`` or one
``step_XXXXXXXX/``. The prompt is encoded with the tokenizer the run trained on (copied into the
run directory as ``tokenizer.json``) and the continuation decoded with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher.ckpt_command import checkpoint_errors, say_which
from launcher.errors import UsageError
from launcher.launch_command import positive_int


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0 (0: always the most likely token), got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="sample text from a trained GPT run (CPU, one process)",
                                   description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("run", type=Path, metavar="RUN",
                        help="run directory, its checkpoints/ directory, or one step_XXXXXXXX/ checkpoint")
    parser.add_argument("--prompt", required=True, help="text the sample continues")
    parser.add_argument("--max-new-tokens", type=positive_int, default=50, metavar="N",
                        help="tokens to generate (default 50)")
    parser.add_argument("--temperature", type=_temperature, default=1.0, metavar="T",
                        help="softmax temperature (default 1; 0: the most likely token each time)")
    parser.add_argument("--top-k", type=positive_int, metavar="K", help="draw only from the K most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default 0)")
    parser.add_argument("--json", action="store_true", help="print the token ids and text as JSON")
    parser.set_defaults(func=run)


def _tokenizer(run_dir: Path):
    from tokenizers import Tokenizer

    from training.provenance import RUN_TOKENIZER

    path = run_dir / RUN_TOKENIZER
    if not path.is_file():
        raise UsageError(f"RUN: no {RUN_TOKENIZER} in {run_dir}: generate needs a run trained on text shards "
                         "(`translution data text …`, data.kind=text), which keeps its tokenizer there")
    return Tokenizer.from_file(str(path))


def run(args: argparse.Namespace) -> int:
    import torch

    from training.checkpoint.locate import locate, model_config
    from training.checkpoint.trained_model import load_model
    from translution_dist.models.sampling import sample

    with checkpoint_errors():
        located = locate(args.run)
        say_which(located)
        arch = model_config(located).arch
        if arch != "gpt":
            raise UsageError(f"RUN: {located.path} holds a {arch} model; generate samples from GPT runs (arch=gpt)")
        tokenizer = _tokenizer(located.path.parent.parent)  # step_XXXXXXXX/ -> checkpoints/ -> the run
        model = load_model(located)
    prompt = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not prompt:
        raise UsageError("--prompt: give at least one character to continue")
    ids = sample(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 vocab_limit=tokenizer.get_vocab_size(), generator=torch.Generator().manual_seed(args.seed))
    text = tokenizer.decode(prompt + ids, skip_special_tokens=False)
    if args.json:
        print(json.dumps({"checkpoint": str(located.path), "step": located.step, "prompt_ids": prompt, "ids": ids,
                          "text": text}))
    else:
        print(text)
    return 0
