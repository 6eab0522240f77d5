"""The training layer: the loop, its backends (torch, DeepSpeed), the run config, tracking and checkpoints.

It sits above ``parallelism`` and ``translution_dist`` and below ``launcher``: it imports both
and nothing imports it but the launcher.
"""
