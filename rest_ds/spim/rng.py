"""One random stream shared by the sp group for randomness on replicated tensors.

DropPath (stochastic depth) draws one keep/drop decision per *sample*
(``x.new_empty((B, 1, ...)).bernoulli_(p)``, a replicated tensor): every rank of
an sp group must draw the same decision, or the tiles of one scene would see
different networks. Randomness on tiles (dropout masks on a SpatialTensor) may
differ per rank and keeps using each rank's default generator.

While a parallelized model runs forward, a ``TorchFunctionMode`` runs every
random op whose arguments are all plain tensors on a shared generator state:
the default generator's state is swapped for the shared one around the op
(``torch.random.fork_rng``), so ops without a ``generator=`` argument
(``F.dropout`` on a replicated tensor, ``bernoulli_``) are covered too. The
stream is seeded identically on every sp rank (broadcast from sp rank 0) and
differently across dp replicas. A single-device reference run under the same
:class:`SharedRNG` seed draws the same numbers, which is how ``verify`` checks
stochastic-depth models exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .tensor import SpatialTensor

_RANDOM_NAMES = (
    "bernoulli bernoulli_ uniform_ normal_ random_ exponential_ cauchy_ geometric_ log_normal_ rand randn randint "
    "randperm rand_like randn_like randint_like normal poisson multinomial dropout dropout_ alpha_dropout "
    "feature_alpha_dropout dropout1d dropout2d dropout3d rrelu rrelu_"
).split()
RANDOM_FUNCS = {f for n in _RANDOM_NAMES for o in (torch, torch.Tensor, F) if callable(f := getattr(o, n, None))}


def _has_spatial(obj) -> bool:
    if isinstance(obj, SpatialTensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_has_spatial(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_spatial(o) for o in obj.values())
    return False


class SharedRNG:
    """A generator state (CPU, and the current CUDA device's) advanced only by
    random ops on replicated tensors."""

    def __init__(self, seed: int):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self._cpu = torch.get_rng_state()
            self._cuda = torch.cuda.get_rng_state() if devices else None
        self._devices = devices

    def run(self, func, args, kwargs):
        with torch.random.fork_rng(devices=self._devices):
            torch.set_rng_state(self._cpu)
            if self._cuda is not None:
                torch.cuda.set_rng_state(self._cuda)
            out = func(*args, **kwargs)
            self._cpu = torch.get_rng_state()
            if self._cuda is not None:
                self._cuda = torch.cuda.get_rng_state()
        return out


class SharedRandomness(TorchFunctionMode):
    """Route random ops on replicated tensors to ``rng`` while active."""

    def __init__(self, rng: SharedRNG):
        super().__init__()
        self.rng = rng

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_FUNCS and "generator" not in kwargs and not _has_spatial(args) and not _has_spatial(kwargs):
            return self.rng.run(func, args, kwargs)
        return func(*args, **kwargs)
