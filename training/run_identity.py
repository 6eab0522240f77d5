"""Whether a run directory's checkpoints belong to the config now started in it: one run per directory, over time.

The run lock (:mod:`training.run_lock`) keeps two live runs apart; this keeps apart runs that
follow each other. A run resumes from the newest checkpoint of its directory, so a config that
differs in what defines the run (seed, model, data) would continue another run's weights, and
``train.resume=never`` would interleave its checkpoints with the old ones (a restart then
resumes whichever is newer). Both are refused. What a resumed run may change (layout, engine,
world size, steps, cadences, tracking, cluster) passes; a hyper-parameter or data-order change
passes with a warning that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.checkpoint.locate import CheckpointToolError, locate
from training.config import Config, flatten, flatten_dict

DEFINING = ("run.seed", "model.", "data.kind", "data.synthetic.")
"""Keys (or key prefixes) whose change makes another run."""
RESHARDED = ("model.bank_chunks",)
"""Model keys that only cut the same weights differently (checkpoints reshard on load)."""
CHANGING = ("optim.", "train.micro_batch_size", "train.grad_accum", "train.precision", "data.shuffle_buffer",
            "data.samples_per_epoch")
"""Keys a resumed run may change, but whose change the user should know about."""


class OtherRunError(ValueError):
    """The run directory's checkpoints belong to another run."""


def _differences(saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{key}: saved {saved.get(key)!r}, now {now.get(key)!r}"
            for key in sorted(saved.keys() | now.keys())
            if key.startswith(keys) and key not in RESHARDED and saved.get(key) != now.get(key)]


def check_run_identity(cfg: Config, run_dir: Path) -> list[str]:
    """Refuse (:class:`OtherRunError`) a config that would mix with the run whose checkpoints ``run_dir`` holds.

    Returns the warnings to log: the hyper-parameters this segment changes.
    """
    try:
        newest = locate(run_dir / "checkpoints", verify_checksums=False)
    except CheckpointToolError:
        return []  # no complete checkpoint: nothing to mix with
    if cfg.train.resume == "never":
        raise OtherRunError(f"train.resume: never, but {run_dir} holds checkpoints up to {newest.path.name}; a new run "
                         "there would mix its checkpoints with them: choose another run.name, or remove "
                         f"{run_dir / 'checkpoints'}")
    saved = flatten_dict(newest.meta.get("config", {}))
    now = flatten(cfg)
    defining = _differences(saved, now, DEFINING)
    if defining:
        raise OtherRunError(f"run.name: {run_dir} holds another run (checkpoint {newest.path.name}), whose "
                         f"{'; '.join(defining)}; resuming it with this config would continue that run's weights: "
                         "choose another run.name or run.output_dir for a new run, or use the saved values "
                         f"({newest.path / 'meta.json'}) to continue it")
    changed = _differences(saved, now, CHANGING)
    return [f"resuming {newest.path.name} with changed settings: {'; '.join(changed)}"] if changed else []

