"""SPIM, the Spatial Parallel Interaction Mechanism.

A scene is split over the ``sp`` ranks of a mesh as a ``ph x pw`` grid of tiles;
``parallelize(model, mesh)`` makes an ordinary single-device model compute on
the tiles exactly what it computes on the whole scene (docs/design.md section 2).
"""
from .comm import CommStats, comm_stats, track_comm
from .errors import SPIMError, SPIMUnsupportedError
from .halo import reference_paths, set_reference_paths
from .mesh import SpatialMesh, init_distributed
from .parallelize import average_gradients, parallelize, unparallelize
from .rng import install_rng, rng_state, set_rng_state
from .sharding import from_local, gather, shard, to_local
from .tensor import SpatialTensor, Spec
from .tiling import TileLayout, check_aligned, choose_grid, split_extent
from .verify import VerifyReport, compare_sharded, rel_error, verify
from . import ops  # noqa: F401  (registers the sharded op rules)

__all__ = [
    "CommStats", "comm_stats", "track_comm", "SPIMError", "SPIMUnsupportedError", "SpatialMesh",
    "init_distributed", "parallelize", "unparallelize", "average_gradients", "from_local", "gather", "shard",
    "to_local",
    "SpatialTensor", "Spec", "TileLayout", "check_aligned", "choose_grid", "split_extent",
    "VerifyReport", "compare_sharded", "rel_error", "verify", "install_rng", "rng_state", "set_rng_state",
    "reference_paths", "set_reference_paths",
]
