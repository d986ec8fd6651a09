"""One random stream shared by the sp group for the duration of a forward.

DropPath (stochastic depth) draws one keep/drop decision per *sample*
(``x.new_empty((B, 1, ...)).bernoulli_(p)``, a replicated tensor): every rank of
an sp group must draw the same decision, or the tiles of one scene would see
different networks. So while a parallelized model runs forward, torch's
*default* generator holds a state shared by the sp group (seeded identically
on every sp rank, differently across dp replicas); the user's own state is put
back when the forward ends (also when it raises). Replicated random ops then
agree across ranks without any interception, and ``torch.utils.checkpoint``,
which stashes and restores the default generator for its recompute, replays
the same draws in backward.

Randomness on a *tile* (dropout on a SpatialTensor) must differ between tiles:
its op draws one seed from the shared stream (so the stream stays in step on
every rank) and runs under ``seed, sp index`` in a forked generator, which a
checkpoint recompute reproduces too.

A single-device reference run inside :meth:`SharedRNG.active` with the same
seed draws the same replicated numbers, which is how ``verify`` checks
stochastic-depth models exactly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_RANDOM_NAMES = (
    "bernoulli bernoulli_ uniform_ normal_ random_ exponential_ cauchy_ geometric_ log_normal_ rand randn randint "
    "randperm rand_like randn_like randint_like normal poisson multinomial dropout dropout_ alpha_dropout "
    "alpha_dropout_ feature_alpha_dropout feature_alpha_dropout_ dropout1d dropout2d dropout3d rrelu rrelu_"
).split()
RANDOM_FUNCS = {f for n in _RANDOM_NAMES for o in (torch, torch.Tensor, F) if callable(f := getattr(o, n, None))}


def _devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


class SharedRNG:
    """A generator state (CPU, and the current CUDA device's) that becomes the
    default generator's state inside :meth:`active`."""

    def __init__(self, seed: int):
        with torch.random.fork_rng(devices=_devices()):
            torch.manual_seed(seed)
            self._cpu = torch.get_rng_state()
            self._cuda = torch.cuda.get_rng_state() if _devices() else None
        self._saved: list = []

    def enter(self) -> None:
        self._saved.append((torch.get_rng_state(), torch.cuda.get_rng_state() if self._cuda is not None else None))
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state(self._cuda)

    def exit(self) -> None:
        if not self._saved:
            return
        self._cpu = torch.get_rng_state()
        if self._cuda is not None:
            self._cuda = torch.cuda.get_rng_state()
        cpu, cuda = self._saved.pop()
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    @contextlib.contextmanager
    def active(self):
        self.enter()
        try:
            yield self
        finally:
            self.exit()


_DROPOUTS = {f for n in ("dropout", "dropout_", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
                          "feature_alpha_dropout_", "dropout1d", "dropout2d", "dropout3d")
             for o in (torch, F) if callable(f := getattr(o, n, None))}


def _is_noop(func, args, kwargs) -> bool:
    """Dropout with p = 0 or outside training draws nothing on one device; it must
    not advance the shared stream here either."""
    if func not in _DROPOUTS:
        return False
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    return p == 0 or not training


def run_on_tile(func, args, kwargs, sp_index: int):
    """A random op on this rank's tile: a seed from the (shared) default stream,
    made distinct per rank, in a forked generator."""
    if _is_noop(func, args, kwargs):
        return func(*args, **kwargs)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    with torch.random.fork_rng(devices=_devices()):
        torch.manual_seed((seed + 0x9E3779B97F4A7C15 * (sp_index + 1)) % (2 ** 63))
        return func(*args, **kwargs)
