"""``translution ckpt inspect|export|reshard``: offline tools for a run's checkpoints.

Each takes PATH: a run directory, its ``checkpoints/`` or one ``step_XXXXXXXX/``; for the first
two the newest complete, verified checkpoint is used (and named). Nothing here starts a
process group; the tools read the DCP checkpoints that every engine (fsdp, none, deepspeed) writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.errors import UsageError
from launcher.launch_command import intermixed

if TYPE_CHECKING:
    from training.checkpoint.locate import Located

RESHARD_HELP = (
    "Rewrite a checkpoint for another model.bank_chunks, the one layout change the loader cannot make "
    "(bank parameter names and shapes change; optimizer moments are regrouped with them). Other changes need "
    "no offline step: DCP stores global shapes, so a run resumes under any engine, dp_replicate/dp_shard/tp/dispp "
    "degrees and world size by itself. The output is a new run directory DIR (config.yaml with the new "
    "settings, checkpoints/step_XXXXXXXX/); continue with `translution train DIR/config.yaml`. The whole checkpoint "
    "(model and optimizer) is held in host memory while converting; the rank files (RNG, data position) are kept, "
    "so a run at the source's world size continues exactly.")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ckpt", help="inspect, export or reshard checkpoints (offline)",
                                   description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    path_help = "run directory, its checkpoints/ directory, or one step_XXXXXXXX/ checkpoint"

    inspect = commands.add_parser("inspect", help="step, layout and every tensor (global shapes), from metadata",
                                  description="Show a checkpoint's step, world size, layout, model, and every "
                                              "tensor with its global shape, dtype and size, without loading them.")
    inspect.add_argument("path", type=Path, help=path_help)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                         help="check the SHA-256 of every file (default); --no-verify only requires the "
                              "completion marker (fast for huge checkpoints)")
    inspect.set_defaults(func=run_inspect)

    export = commands.add_parser("export", help="the model weights as one consolidated safetensors file",
                                 description="Write the model weights of a checkpoint to one safetensors file "
                                             "(streamed: the optimizer state is never read).")
    export.add_argument("path", type=Path, help=path_help)
    export.add_argument("--out", type=Path, required=True, metavar="FILE.safetensors", help="file to write")
    export.add_argument("--official", choices=("vit", "gpt"),
                        help="use the official Translution code's names for this arch (must be the checkpoint's)")
    export.add_argument("--query-projection", choices=("to_k", "to_q"),
                        help="with --official: which official bank multiplies the query token, i.e. which "
                             "official file the weights are for (see docs/official_weights.md). to_k: "
                             "ViT/models/translution.py up to commit 0845c3e (lution_vit_*), "
                             "ViT/models/alpha_translution.py, the CausalSharedParameter1/2 GPT translution.py; "
                             "to_q: ViT/models/translution.py from ef01c2b on (qkv_*, kv_*, ...), the "
                             "QKVTranslution GPT translution.py, lor_translution.py, RoPE and hybrid files. "
                             "Required for full (q, k, v) Translution and alpha models, which both have; "
                             "inferred for the others")
    export.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of floating-point weights (default fp32, the master weights)")
    export.set_defaults(func=run_export)

    reshard = intermixed(commands.add_parser("reshard", help="rewrite a checkpoint for another bank_chunks",
                                             description=RESHARD_HELP))
    reshard.add_argument("path", type=Path, help=path_help)
    reshard.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="model.bank_chunks=N or parallel.* settings recorded for the new run")
    reshard.add_argument("--out", type=Path, required=True, metavar="DIR", help="new run directory (must not exist)")
    reshard.add_argument("--bank-chunks", type=int, metavar="N", help="same as model.bank_chunks=N")
    reshard.set_defaults(func=run_reshard)


@contextmanager
def checkpoint_errors() -> Iterator[None]:
    """What the tools refuse (missing path, incomplete or corrupted checkpoint, unwritable output) exits 2.

    The tools' modules are imported here, on use, so that other commands do not load them.
    """
    from training.checkpoint.locate import CheckpointToolError

    try:
        yield
    except CheckpointToolError as err:
        raise UsageError(str(err)) from err


def say_which(located: Located) -> None:
    """Name the checkpoint picked from a directory, and why newer ones were passed over."""
    if located.chosen_from is not None:
        print(f"using {located.path} (the newest good checkpoint in {located.chosen_from})", file=sys.stderr)
    for name, why in located.skipped:
        print(f"  skipped {name}: {why}", file=sys.stderr)


def run_inspect(args: argparse.Namespace) -> int:
    from training.checkpoint.inspection import describe, format_report
    from training.checkpoint.locate import locate

    with checkpoint_errors():
        report = describe(locate(args.path, verify_checksums=args.verify))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.query_projection and not args.official:
        raise UsageError("--query-projection applies to --official exports only; add --official vit|gpt")
    import torch

    from training.checkpoint.export import check_target, export
    from training.checkpoint.inspection import human_bytes
    from training.checkpoint.locate import locate

    with checkpoint_errors():
        check_target(args.out)  # before hashing a possibly huge checkpoint
        located = locate(args.path)
        say_which(located)
        result = export(located, args.out, official=args.official, query_projection=args.query_projection,
                        dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    names = f"official {args.official} names" if args.official else "translution_dist names"
    print(f"wrote {args.out}: {result.tensors} tensors, {human_bytes(result.bytes)} ({args.dtype}, {names}) "
          f"of step {located.step}")
    return 0


def run_reshard(args: argparse.Namespace) -> int:
    from training.checkpoint.locate import locate
    from training.checkpoint.reshard import check_target, reshard

    overrides = list(args.overrides)
    if args.bank_chunks is not None:
        overrides.append(f"model.bank_chunks={args.bank_chunks}")
    if not overrides:
        raise UsageError("nothing to change: give --bank-chunks N (dp/tp/dispp and world-size changes need no "
                         "reshard: the loader does them on resume)")
    with checkpoint_errors():
        check_target(args.out)
        located = locate(args.path)
        say_which(located)
        result = reshard(located, args.out, overrides)
    before, after = result.bank_chunks
    print(f"wrote {result.checkpoint} (step {located.step}, world size {located.meta.get('world_size')}): "
          f"bank_chunks {before} -> {after}, {result.banks} bank parameters regrouped with their optimizer state\n"
          f"continue with: translution train {result.run_dir / 'config.yaml'}")
    return 0
