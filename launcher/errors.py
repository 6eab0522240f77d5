"""Errors every ``translution`` command shares.

In a module of their own so that ``python -m launcher.cli`` (which torchrun workers run)
and ``import launcher.cli`` see the same class.
"""


class UsageError(Exception):
    """Bad input on the command line; the message says what and how to fix it."""
