"""Scene augmentation that every rank of an sp group applies identically, tile by tile.

An :class:`AugmentPlan` is drawn from ``(seed, epoch, scene name, dp rank)`` only,
so all sp ranks of one dp replica draw the same plan without communicating, and
different dp ranks (or epochs, or scenes) draw different ones. The plan defines
the *augmented scene*:

1. a random crop ``[r0, r0 + h) x [c0, c0 + w)`` of the source scene (optional;
   sides drawn as a fraction of the scene's, rounded down to ``crop_multiple``);
2. ``k`` counter-clockwise 90-degree rotations (``numpy.rot90`` on the H, W axes);
3. an optional left-right flip (rotations and flip together give all 8
   symmetries of the square);
4. per-band gain and shift, then per-pixel Gaussian noise, on the normalised
   values of valid pixels.

The tile layout is computed on the augmented scene (:attr:`AugmentPlan.out_shape`;
a rotation swaps H and W). A rank whose output tile is ``rows x cols`` reads only
:meth:`AugmentPlan.source_window` of it from disk (the rectangle those output
pixels come from), applies the rotation/flip locally, and draws the noise of each
pixel from a counter-based hash of the pixel's *global output* position and the
plan's noise seed. So each rank's tile equals the same slice of the augmented
whole scene, bit for bit, whatever the grid (tests re-assemble tiles to check).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import DataError


@dataclass(frozen=True)
class AugmentConfig:
    """What to draw. ``flip``: left-right flip with probability 1/2. ``rot90``:
    ``k`` uniform in 0..3. ``crop``: ``(lo, hi)`` side fraction range (each side
    independently uniform in it) or None. ``crop_multiple``: crop sides are
    multiples of it (use the model's alignment A). ``min_crop``: smallest side in
    pixels. ``brightness``: per-band gain uniform in ``[1 - b, 1 + b]``.
    ``shift``: per-band offset uniform in ``[-s, s]``. ``noise``: std of the
    per-pixel Gaussian noise. Gain, shift and noise are in normalised units."""

    flip: bool = True
    rot90: bool = True
    crop: tuple[float, float] | None = None
    crop_multiple: int = 1
    min_crop: int = 1
    brightness: float = 0.0
    shift: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        if self.crop is not None:
            lo, hi = self.crop
            if not 0 < lo <= hi <= 1:
                raise DataError(None, f"augment: crop range {self.crop} must satisfy 0 < lo <= hi <= 1")
        if self.crop_multiple < 1 or self.min_crop < 1:
            raise DataError(None, "augment: crop_multiple and min_crop must be >= 1")
        if self.brightness < 0 or self.shift < 0 or self.noise < 0:
            raise DataError(None, "augment: brightness, shift and noise must be >= 0")


def scene_seed(name: str) -> int:
    """A stable 63-bit integer for a scene name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class AugmentPlan:
    """One draw; see the module docstring. ``src_shape``: ``(H, W)`` of the source
    scene; ``crop``: ``(r0, c0, h, w)``; ``k``: rotations; ``flip``: left-right
    after the rotation; ``gain``/``shift``: per band; ``noise``: std."""

    src_shape: tuple[int, int]
    crop: tuple[int, int, int, int]
    k: int = 0
    flip: bool = False
    gain: tuple[float, ...] = ()
    shift: tuple[float, ...] = ()
    noise: float = 0.0
    noise_seed: int = 0

    @classmethod
    def identity(cls, height: int, width: int) -> "AugmentPlan":
        return cls((height, width), (0, 0, height, width))

    @property
    def out_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the augmented scene."""
        _, _, h, w = self.crop
        return (w, h) if self.k % 2 else (h, w)

    @property
    def photometric(self) -> bool:
        return bool(self.gain or self.shift or self.noise)

    def source_window(self, rows: slice, cols: slice) -> tuple[slice, slice]:
        """Global source-scene slices holding the output window ``rows x cols``."""
        Ho, Wo = self.out_shape
        i0, i1 = rows.start or 0, Ho if rows.stop is None else rows.stop
        j0, j1 = cols.start or 0, Wo if cols.stop is None else cols.stop
        if not (0 <= i0 < i1 <= Ho and 0 <= j0 < j1 <= Wo):
            raise DataError(None, f"augment: window rows [{i0}, {i1}) cols [{j0}, {j1}) outside the augmented "
                                  f"scene {Ho}x{Wo}")
        if self.flip:
            j0, j1 = Wo - j1, Wo - j0
        r0, c0, H, W = self.crop
        # Window (a, b) of rot90(m, k) comes from these rows/cols of m (m is H x W):
        k = self.k % 4
        if k == 0:
            (s0, s1), (t0, t1) = (i0, i1), (j0, j1)
        elif k == 1:        # out[i, j] = m[j, W-1-i]
            (s0, s1), (t0, t1) = (j0, j1), (W - i1, W - i0)
        elif k == 2:        # out[i, j] = m[H-1-i, W-1-j]
            (s0, s1), (t0, t1) = (H - i1, H - i0), (W - j1, W - j0)
        else:               # out[i, j] = m[H-1-j, i]
            (s0, s1), (t0, t1) = (H - j1, H - j0), (i0, i1)
        return slice(r0 + s0, r0 + s1), slice(c0 + t0, c0 + t1)

    def geometric(self, block: np.ndarray) -> np.ndarray:
        """Rotate/flip a source block (``..., h, w``) read at :meth:`source_window`
        into its output tile (a new C-contiguous array)."""
        out = np.rot90(block, self.k % 4, axes=(-2, -1)) if self.k % 4 else block
        if self.flip:
            out = out[..., ::-1]
        return np.ascontiguousarray(out)

    def photometric_apply(self, image: np.ndarray, valid: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        """Gain, shift and noise on a normalised ``C x h x w`` output tile at global
        output window ``rows x cols`` (valid pixels only; returns a new array)."""
        out = image.astype(np.float32, copy=True)
        C = out.shape[0]
        if self.gain:
            out *= np.asarray(self.gain, np.float32)[:C, None, None]
        if self.shift:
            out += np.asarray(self.shift, np.float32)[:C, None, None]
        if self.noise:
            out += np.float32(self.noise) * gaussian_field(self.noise_seed, C, self.out_shape, rows, cols)
        return np.where(valid[None], out, image.astype(np.float32, copy=False))


def plan_augmentation(config: AugmentConfig | None, scene_shape: tuple[int, ...], *, seed: int, epoch: int,
                      scene: str, dp_rank: int) -> AugmentPlan:
    """Draw the plan for one scene. ``scene_shape``: ``(C, H, W)`` (or ``(H, W)``,
    then no per-band terms). Same arguments -> same plan on every rank."""
    if len(scene_shape) == 3:
        C, H, W = scene_shape
    else:
        C, (H, W) = 0, scene_shape
    if config is None:
        return AugmentPlan.identity(H, W)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), int(epoch), scene_seed(scene),
                                                        int(dp_rank)]))
    # Fixed draw order: every quantity is drawn whatever the config, so enabling one
    # augmentation does not change the others' draws.
    u_crop = rng.random(4)
    k_draw = int(rng.integers(0, 4))
    flip_draw = bool(rng.integers(0, 2))
    gains = rng.uniform(-1.0, 1.0, size=C)
    shifts = rng.uniform(-1.0, 1.0, size=C)
    noise_seed = int(rng.integers(0, 2**63 - 1))

    r0, c0, h, w = 0, 0, H, W
    if config.crop is not None:
        lo, hi = config.crop
        m = config.crop_multiple

        def side(n: int, u: float) -> int:
            s = int(round(n * (lo + (hi - lo) * u)))
            s = max(config.min_crop, min(n, s))
            s = (s // m) * m if s >= m else s
            return max(1, min(n, s))

        h, w = side(H, u_crop[0]), side(W, u_crop[1])
        r0 = int(u_crop[2] * (H - h + 1)) if H > h else 0
        c0 = int(u_crop[3] * (W - w + 1)) if W > w else 0
    return AugmentPlan(
        src_shape=(H, W), crop=(r0, c0, h, w), k=k_draw if config.rot90 else 0,
        flip=flip_draw if config.flip else False,
        gain=tuple(float(1.0 + config.brightness * g) for g in gains) if config.brightness else (),
        shift=tuple(float(config.shift * s) for s in shifts) if config.shift else (),
        noise=float(config.noise), noise_seed=noise_seed,
    )


# --- counter-based noise --------------------------------------------------------------------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 arrays (wrap-around arithmetic is the point)."""
    with np.errstate(over="ignore"):
        z = x + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def gaussian_field(seed: int, bands: int, shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    """float32 ``bands x h x w`` standard normal values of the global window
    ``rows x cols`` of a ``bands x H x W`` field: each value depends only on
    ``(seed, band, row, col)`` (splitmix64 hash + Box-Muller), so any tiling of
    the field reproduces it exactly."""
    H, W = shape
    b = np.arange(bands, dtype=np.uint64)[:, None, None]
    i = np.arange(rows.start, rows.stop, dtype=np.uint64)[None, :, None]
    j = np.arange(cols.start, cols.stop, dtype=np.uint64)[None, None, :]
    idx = (b * np.uint64(H) + i) * np.uint64(W) + j
    key = _splitmix64(np.full(1, seed & (2**64 - 1), dtype=np.uint64))[0]
    u = _splitmix64((idx * np.uint64(2)) ^ key)
    v = _splitmix64((idx * np.uint64(2) + np.uint64(1)) ^ key)
    scale = 2.0 ** -53
    u1 = ((u >> np.uint64(11)).astype(np.float64) + 0.5) * scale   # (0, 1): log is finite
    u2 = (v >> np.uint64(11)).astype(np.float64) * scale
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)
