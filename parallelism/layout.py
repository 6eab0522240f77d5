"""A ``parallel`` config resolved for one world size: the layout every part of a process reads.

:class:`ParallelDims` is built once per process and passed on, as torchtitan's ``ParallelDims``
is: the mesh, the data-parallel coordinates, the engine's sharding and the checkpoint's layout
tag all read the same degrees instead of resolving ``dp_shard = -1`` again. Whether a layout
suits a model (``tp`` divides the heads, …) is :meth:`ParallelConfig.check_model`, the one
place those rules live.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallelism.config import DEGREES, EngineName, ParallelConfig

DP_DIMS = ("dp_replicate", "dp_shard")
"""The mesh dims over which ranks see different data; ``pp``, ``dispp`` and ``tp`` peers share their batch."""


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees (``pp · dp_replicate · dp_shard · dispp · tp = world_size``) and the engine."""

    config: ParallelConfig
    world_size: int

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Fill in ``dp_shard = -1`` for ``world_size``; a ``ValueError`` names the degrees that do not fit."""
        return cls(cfg.resolve(world_size), world_size)

    @property
    def engine(self) -> EngineName:
        return self.config.engine

    @property
    def sizes(self) -> dict[str, int]:
        """Every degree by mesh dim name, outermost first."""
        return {name: getattr(self.config, name) for name in DEGREES}

    @property
    def dp_size(self) -> int:
        """Ranks that see different data (``dp_replicate · dp_shard``)."""
        return self.config.dp_replicate * self.config.dp_shard

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model between them (``dispp · tp``)."""
        return self.config.model_parallel_size

    @property
    def pp_size(self) -> int:
        """Pipeline ranks (stage groups); they hold different blocks and share their data-parallel rank's batch."""
        return self.config.pp

    @property
    def uses_process_group(self) -> bool:
        """Whether this layout needs ``torch.distributed`` at all (a single unsharded process does not)."""
        return self.world_size > 1 or self.engine != "none"

    def tag(self, bank_chunks: int) -> str:
        """The layout in one line (MLflow tag, checkpoint ``meta.json``)."""
        c = self.config
        pipeline = f",pp={c.pp}" if c.pp > 1 else ""
        return (f"{c.engine}:dp_replicate={c.dp_replicate},dp_shard={c.dp_shard},tp={c.tp},dispp={c.dispp}{pipeline}"
                f",bank_chunks={bank_chunks}")
