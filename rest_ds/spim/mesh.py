"""The device mesh of a job: ``world = dp x sp`` ranks, sp ranks laid out as a grid.

Rank ``r`` has ``dp_index = r // sp`` and ``sp_index = r % sp``: the ranks that
share a scene are consecutive, so on a multi-GPU node they share the fast
intra-node links. Within an sp group, ``sp_index = row * pw + col`` (row-major
grid over the scene).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import SPIMError

DEFAULT_TIMEOUT_S = float(os.environ.get("REST_DS_COLLECTIVE_TIMEOUT", "300"))
_timeout_s = DEFAULT_TIMEOUT_S  # what init_distributed was given (the shared-memory waits use it too)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Initialise ``torch.distributed`` from the usual environment variables
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, as set by
    torchrun, the deepspeed launcher or SLURM wrappers) unless already done.

    gloo on CPU, nccl when CUDA is available. Collectives time out after
    ``timeout_s`` (default ``$REST_DS_COLLECTIVE_TIMEOUT`` or 300 s) so that a
    rank that died never leaves the others hanging forever."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    global _timeout_s
    _timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    timeout = datetime.timedelta(seconds=_timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


@dataclass(frozen=True)
class SpatialMesh:
    """``dp x sp`` ranks; the sp ranks as a ``ph x pw`` grid.

    ``sp_group`` is the process group of this rank's scene (None when sp == 1),
    ``dp_group`` that of the ranks holding the same tile position of different
    scenes (None when dp == 1). ``sp_ranks[i]`` is the global rank of grid cell
    ``i`` of this rank's sp group. ``shm`` is the sp group's shared-memory
    channel (:mod:`.shm`) when its ranks share a host and the backend is gloo,
    else None (gloo carries everything)."""

    dp: int
    sp: int
    grid: tuple[int, int]
    rank: int
    sp_group: object | None = field(compare=False, repr=False)
    dp_group: object | None = field(compare=False, repr=False)
    sp_ranks: tuple[int, ...] = ()
    shm: object | None = field(default=None, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return self.dp * self.sp

    @property
    def sp_index(self) -> int:
        return self.rank % self.sp

    @property
    def dp_index(self) -> int:
        return self.rank // self.sp

    @property
    def coord(self) -> tuple[int, int]:
        """(row, col) of this rank in the grid."""
        return divmod(self.sp_index, self.grid[1])

    def rank_at(self, row: int, col: int) -> int:
        """Global rank of grid cell (row, col) in this rank's sp group."""
        return self.sp_ranks[row * self.grid[1] + col]

    @classmethod
    def single(cls) -> "SpatialMesh":
        """A one-rank mesh: no communication, useful to run parallelized code in one process."""
        return cls(1, 1, (1, 1), 0, None, None, (0,))

    @classmethod
    def build(cls, sp: int | None = None, grid: tuple[int, int] | None = None) -> "SpatialMesh":
        """Create the mesh over the initialised default process group.

        ``sp`` defaults to ``grid[0] * grid[1]`` or to the world size; ``grid``
        defaults to ``(1, sp)``. Must be called by every rank (it creates the
        process groups collectively)."""
        if not dist.is_initialized():
            if (sp or 1) == 1 and (grid is None or grid == (1, 1)):
                return cls.single()
            raise SPIMError("SpatialMesh.build: torch.distributed is not initialised; call rest_ds.spim.init_distributed() first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if grid[0] < 1 or grid[1] < 1:
                raise SPIMError(f"grid {grid} must have positive sides")
            if sp is not None and sp != grid[0] * grid[1]:
                raise SPIMError(f"grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} ranks but sp={sp}")
            sp = grid[0] * grid[1]
        sp = sp or world
        if world % sp:
            raise SPIMError(f"world size {world} is not divisible by sp={sp} (world = dp x sp)")
        grid = grid or (1, sp)
        dp = world // sp
        sp_group = dp_group = None
        sp_ranks: tuple[int, ...] = ()
        for d in range(dp):  # every rank must take part in creating every group
            ranks = list(range(d * sp, (d + 1) * sp))
            g = dist.new_group(ranks) if sp > 1 and dp > 1 else (dist.group.WORLD if sp > 1 else None)
            if rank in ranks:
                sp_group, sp_ranks = g, tuple(ranks)
        for s in range(sp):
            ranks = list(range(s, world, sp))
            g = dist.new_group(ranks) if dp > 1 and sp > 1 else (dist.group.WORLD if dp > 1 else None)
            if rank in ranks:
                dp_group = g
        shm = None
        if sp > 1 and dist.get_backend(sp_group) == "gloo":
            from .shm import open_channel

            shm = open_channel(sp_group, rank % sp, sp_ranks, grid, _timeout_s)
        return cls(dp, sp, grid, rank, sp_group, dp_group, sp_ranks, shm)
