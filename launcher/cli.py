"""``translution``: one command with a subcommand per job.

Each subcommand lives in its own module, which exposes ``register(subparsers)`` and sets
``func`` on its parser; ``func(args)`` returns the exit code. Bad input raises
:class:`launcher.errors.UsageError` (or :class:`training.config.ConfigError`): the
message is printed and the exit code is 2, as with argparse's own errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "launcher.train_command",
    "translution_dist.data.cli",
    "launcher.launch_command",
    "launcher.topology_command",
    "launcher.plan_command",
    "launcher.k8s_command",
    "launcher.ckpt_command",
    "launcher.generate_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="translution", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue  # a command that is not part of this installation
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from launcher.errors import UsageError
    from training.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as err:
        print(f"translution {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
