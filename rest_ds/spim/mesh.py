"""The device mesh of a job: ``world = dp x sp`` ranks, sp ranks laid out as a grid.

Rank ``r`` has ``dp_index = r // sp`` and ``sp_index = r % sp``: the ranks that
share a scene are consecutive, so on a multi-GPU node they share the fast
intra-node links. Within an sp group, ``sp_index = row * pw + col`` (row-major
grid over the scene).
"""
from __future__ import annotations

import datetime
import os
import warnings
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
        if sp > 1:
            from .shm import host_id, open_channel

            hosts: list = [None] * world  # one gather: every rank decides from the same list
            dist.all_gather_object(hosts, host_id())
            note = placement_warning(hosts, sp)
            if note and rank == 0:
                warnings.warn(note, SPIMPlacementWarning, stacklevel=2)
            if dist.get_backend(sp_group) == "gloo":
                shm = open_channel(sp_group, rank % sp, sp_ranks, grid, _timeout_s,
                                   hosts=[hosts[r] for r in sp_ranks])
        return cls(dp, sp, grid, rank, sp_group, dp_group, sp_ranks, shm)


class SPIMPlacementWarning(UserWarning):
    """The sp groups span hosts although a placement that keeps them inside one exists."""


def placement_warning(hosts: list[str], sp: int) -> str | None:
    """A message when an sp group (ranks ``d*sp .. d*sp+sp-1``) spans several hosts
    although it need not: ``hosts[r]`` is rank ``r``'s host. Spanning is needed
    only when a host has fewer than ``sp`` ranks; otherwise the halo traffic of
    a scene crosses the network because ``sp`` does not divide the ranks per
    host, or because ranks are not placed in blocks per host. None when fine."""
    world = len(hosts)
    spans = [d for d in range(world // sp) if len(set(hosts[d * sp:(d + 1) * sp])) > 1]
    if not spans:
        return None
    per_host: dict[str, int] = {}
    for h in hosts:
        per_host[h] = per_host.get(h, 0) + 1
    if max(per_host.values()) < sp:
        return None  # a scene needs more ranks than any host has: it must span hosts
    d = spans[0]
    where = f"sp group {d} (ranks {d * sp}-{d * sp + sp - 1}) spans hosts {sorted(set(hosts[d * sp:(d + 1) * sp]))}"
    if all(n % sp == 0 for n in per_host.values()):
        why = ("ranks are not placed in blocks per host (rank r and r+1 on different hosts); start them "
               "block-wise, e.g. SLURM --distribution=block, consecutive node ranks per host")
    else:
        counts = sorted(set(per_host.values()))
        why = (f"mesh.sp={sp} does not divide the ranks per host ({', '.join(map(str, counts))}); choose sp "
               f"dividing it, or as many ranks per host as a multiple of sp")
    return (f"{len(spans)} of {world // sp} scenes' halo exchanges cross hosts: {where}: {why}. "
            f"Results are still exact, only slower")
