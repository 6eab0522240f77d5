"""Curves people would rather look at than tables: loss, learning rate and evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """One panel per metric series (``name -> [(step, value)]``), saved as a PNG.

    Written to a temporary file renamed into place, so a failed write (a full disk) raises ``OSError``
    and leaves no partial ``path`` behind.
    """
    names = [name for name, points in history.items() if points]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.4 * len(names)), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], names):
        steps, values = zip(*history[name])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path
