"""What each rank reads in a training job.

* ``whole`` mode: micro-step ``m`` of dp replica ``d`` trains on scene
  ``(m * dp + d) mod n_scenes``, augmented by the plan drawn from
  ``(seed, m, scene, d)`` (the same plan on every sp rank of the replica, a
  different one on every replica); every sp rank reads only its tile of the
  augmented scene (rest_ds.data.tiles).
* ``crop`` mode (the cropping baseline; sp = 1): rank ``r`` draws
  ``crops_per_rank`` square crops from ``(seed, m, r)``, each with at least
  ``min_labelled`` labelled pixels where possible, and a random rotation/flip.

Both are pure functions of ``(seed, micro-step, rank)``: a resumed job reads
exactly what the uninterrupted one would have read.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import (AugmentConfig, DataError, DataWarning, Scene, SceneReader, load_sample, plan_augmentation,
                    WindowCache, prepare_scene, read_tile)
from ..data.samples import SAMPLES, is_fetched
from ..spim import SPIMError
from ..spim.tiling import TileLayout, choose_grid, grid_cost
from .inference import padded_shape, read_padded


def resolve_scene(ref: str, cache: str | None = None, fetch: bool = True) -> Scene:
    """A :class:`Scene` from a sample name (fetched into the cache if ``fetch``),
    a scene YAML path, or a single raster file (GeoTIFF, ...; no label)."""
    if ref in SAMPLES:
        if not fetch and not is_fetched(ref, cache):
            raise DataError(None, f"sample '{ref}' is not fetched (rank 0 fetches it first)")
        return load_sample(ref, cache, fetch=fetch)
    p = Path(ref)
    if p.suffix.lower() in (".yaml", ".yml"):
        return Scene.from_yaml(p)
    if p.is_file():
        from ..data.scene import Source
        return Scene(name=p.stem, image=Source(path=str(p.resolve())))
    if (p / "scene.yaml").is_file():
        return Scene.from_yaml(p / "scene.yaml")
    raise DataError(ref, "not a sample name, a scene YAML, or a raster file "
                         f"(samples: {', '.join(SAMPLES)})")


@dataclass
class OpenScene:
    reader: SceneReader
    stats: object            # BandStats
    summary: object          # SceneSummary or None

    @property
    def name(self) -> str:
        return self.reader.scene.name


def open_scenes(refs: list[str], *, cache: str | None, expected_bands: int | None, scan: bool,
                first: bool, barrier) -> list[OpenScene]:
    """Open every scene: global rank 0 (``first``) fetches samples and writes the
    statistics caches, then ``barrier()``, then the other ranks open them."""
    def _open(fetch: bool):
        out = []
        for ref in refs:
            scene = resolve_scene(ref, cache, fetch=fetch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)  # datum-only CRS differences: reported by 'data info'
                reader, summary, stats = prepare_scene(scene, expected_bands=expected_bands, scan=scan,
                                                       cache_dir=cache)
            if stats is None:
                reader.close()
                raise DataError(scene.source_file, f"scene '{scene.name}': no normalisation statistics (give stats: "
                                                   f"in the description or set data.scan: true)")
            out.append(OpenScene(reader, stats, summary))
        return out

    err = None
    scenes = None
    if first:
        try:
            scenes = _open(True)
        except BaseException as e:  # let the others pass the barrier, then fail everywhere
            err = e
    barrier()
    if err is not None:
        raise err
    if not first:
        scenes = _open(False)
    return scenes


def has_labelled_pixel(scenes: list[OpenScene], region: str | None, block_rows: int = 512) -> bool:
    """Whether any scene has a pixel that training uses: a class (not label nodata, not
    unlabeled) on valid imagery inside ``region`` (None: anywhere). Reads row blocks and
    stops at the first such pixel (usually within the first block); the image only where
    the label has a class, and only its nodata mask (its values are checked, per rank,
    when the rank reads its tile)."""
    for sc in scenes:
        r = sc.reader
        H, W = r.shape[1:]
        for r0 in range(0, H, block_rows):
            rows, cols = slice(r0, min(r0 + block_rows, H)), slice(0, W)
            lab = r.read_label(rows, cols) != r.scene.ignore_index
            if region is not None and lab.any():
                lab &= r.read_region(region, rows, cols)
            if lab.any() and (lab & r.read_valid(rows, cols)).any():
                return True
    return False


def classes_without_pixels(scenes: list[OpenScene]) -> list[str] | None:
    """Names of the classes that no scene has a labelled pixel of (on valid imagery; the scan's
    whole-scene counts, regions not applied), or None when a scene was not scanned (data.scan)."""
    if not scenes or any(sc.summary is None or not sc.summary.class_counts for sc in scenes):
        return None
    counts = np.sum([sc.summary.class_counts for sc in scenes], axis=0)
    return [n for n, c in zip(scenes[0].reader.scene.class_names, counts) if c == 0]


def _aug_config(cfg, align: int, grid: tuple[int, int] = (1, 1)) -> AugmentConfig:
    a = cfg.data.augment
    # a random sub-scene keeps at least one alignment unit per tile along each axis
    return AugmentConfig(flip=a.flip, rot90=a.rot90, crop=tuple(a.crop) if a.crop else None,
                         crop_multiple=align, min_crop=align * max(grid), brightness=a.brightness, shift=a.shift,
                         noise=a.noise)


class WholeSceneData:
    """Whole-scene micro-batches: this rank's tile of one augmented scene."""

    def __init__(self, scenes: list[OpenScene], cfg, mesh, grid: tuple[int, int], align: int,
                 cache: WindowCache | None = None):
        self.scenes, self.cfg, self.mesh, self.grid, self.align = scenes, cfg, mesh, grid, align
        self.augment = _aug_config(cfg, align, grid)
        self.cache = cache

    def scene_index(self, micro: int) -> int:
        return (micro * self.mesh.dp + self.mesh.dp_index) % len(self.scenes)

    def batch(self, micro: int):
        """``(x 1 x C x h x w, y 1 x h x w int64, layout)`` of micro-step ``micro``:
        this rank's tile of the augmented scene padded to multiples of ``align``."""
        sc = self.scenes[self.scene_index(micro)]
        plan = plan_augmentation(self.augment, sc.reader.shape, seed=self.cfg.seed, epoch=micro,
                                 scene=sc.name, dp_rank=self.mesh.dp_index)
        layout = TileLayout.even(*padded_shape(plan.out_shape, self.align), self.grid, self.align)
        rows, cols = layout.tile(*self.mesh.coord)
        img, lab, _ = read_padded(sc.reader, rows, cols, plan.out_shape, stats=sc.stats, plan=plan,
                                  region=self.cfg.data.train_region, cache=self.cache)
        return torch.from_numpy(img)[None], torch.from_numpy(lab)[None], layout


class CropData:
    """Crop-mode micro-batches: ``crops_per_rank`` random crops of this rank."""

    def __init__(self, scenes: list[OpenScene], cfg, rank: int, tries: int = 20):
        self.scenes, self.cfg, self.rank, self.tries = scenes, cfg, rank, tries

    def batch(self, micro: int):
        """``(x B x C x n x n, y B x n x n int64, None)``; ``n = min(crop_size, H, W)``."""
        d = self.cfg.data
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed & (2 ** 63 - 1), micro, self.rank, 7]))
        xs, ys = [], []
        for _ in range(d.crops_per_rank):
            sc = self.scenes[int(rng.integers(len(self.scenes)))]
            _, H, W = sc.reader.shape
            n = min(d.crop_size, H, W)
            best = None
            for _ in range(self.tries):
                r0, c0 = int(rng.integers(H - n + 1)), int(rng.integers(W - n + 1))
                tile = read_tile(sc.reader, slice(r0, r0 + n), slice(c0, c0 + n), stats=sc.stats,
                                 region=d.train_region)
                frac = float((tile.label != sc.reader.scene.ignore_index).mean())
                if best is None or frac > best[0]:
                    best = (frac, tile)
                if frac >= d.min_labelled:
                    break
            tile = best[1]
            img, lab = tile.image, tile.label
            k = int(rng.integers(4)) if d.augment.rot90 else 0
            flip = bool(rng.integers(2)) if d.augment.flip else False
            img, lab = np.rot90(img, k, axes=(-2, -1)), np.rot90(lab, k, axes=(-2, -1))
            if flip:
                img, lab = img[..., ::-1], lab[..., ::-1]
            xs.append(np.ascontiguousarray(img))
            ys.append(np.ascontiguousarray(lab))
        if len({x.shape for x in xs}) > 1:  # scenes smaller than crop_size along different axes
            raise DataError(None, f"data.crop_size {d.crop_size} is larger than a scene; crops of one batch "
                                  f"differ in size ({sorted({x.shape[1:] for x in xs})}); use a smaller crop_size")
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), None


def scene_tile_layout(shape: tuple[int, ...], grid: tuple[int, int], align: int) -> TileLayout:
    """The layout of a (``C x``) ``H x W`` scene padded to multiples of ``align`` over ``grid``."""
    return TileLayout.even(*padded_shape(tuple(shape)[-2:], align), grid, align)


def grid_fits(grid: tuple[int, int], hw: tuple[int, int], align: int) -> bool:
    """Whether an ``H x W`` scene padded to ``align`` splits into ``grid`` tiles of at least one unit."""
    H, W = padded_shape(tuple(hw), align)
    return H // align >= grid[0] and W // align >= grid[1]


def grid_shapes(train: list[OpenScene], val: list[OpenScene], rot90: bool, crop: bool = False
                ) -> list[tuple[int, int]]:
    """The ``H x W`` sizes one whole-scene grid must split: every training scene (also turned
    by 90 degrees when ``rot90`` augments it; none when an augmentation crop sets the size)
    and every validation scene as it is."""
    out = []
    for sc in ([] if crop else train):
        H, W = sc.reader.shape[-2:]
        out += [(H, W), (W, H)] if rot90 else [(H, W)]
    return out + [tuple(sc.reader.shape[-2:]) for sc in val]


def auto_grid(scenes: list[OpenScene], sp: int, align: int,
              need: list[tuple[int, int]] | None = None) -> tuple[int, int] | None:
    """The grid with the smallest largest tile, then the least halo traffic, on the first (padded)
    scene (rest_ds.spim.choose_grid)
    among those that split every size in ``need`` (default: just that scene); None if none does."""
    return fitting_grid(scenes[0].reader.shape[-2:], sp, align, need)


def fitting_grid(hw: tuple[int, int], sp: int, align: int,
                 need: list[tuple[int, int]] | None = None) -> tuple[int, int] | None:
    """:func:`auto_grid` for a scene of size ``hw``."""
    from ..spim.tiling import factorisations

    H, W = padded_shape(tuple(hw), align)
    fits = [g for g in factorisations(sp) if all(grid_fits(g, s, align) for s in need or [(H, W)])]
    if not fits:
        return None
    try:
        best = choose_grid(H, W, sp, align)
        if best in fits:
            return best
    except SPIMError:
        pass
    return min(fits, key=lambda g: grid_cost(H, W, g, align) or (math.inf,))  # choose_grid's order


def band_order_problem(want, got) -> str | None:
    """Why bands named ``got`` cannot stand for bands named ``want`` position by position: the
    same bands in another order (names compare by spectral role, ``B04`` = ``red``,
    case-insensitive; rest_ds.models.encoders.bands); the message names the ``image.bands``
    indices that read them in the expected order. None otherwise: when they agree, when either
    side names no bands, and for other names (band numbers are sensor-specific: Landsat 8's B2-B7
    are Landsat 7's B1-B5, B7, which a model may rightly be applied to)."""
    from ..models.encoders.bands import canonical

    if not want or not got or len(want) != len(got):
        return None  # a different count is the band-count check's error
    a, b = [canonical(str(n)) for n in want], [canonical(str(n)) for n in got]
    if a == b or sorted(a) != sorted(b) or len(set(b)) != len(b):
        return None
    order = [b.index(n) for n in a]
    return (f"has the same bands in another order ({', '.join(map(str, got))}; expected "
            f"{', '.join(map(str, want))}): read them in that order (image.bands: {order} for one file, "
            f"or paths in that order) and list band_names alike")


__all__ = ["resolve_scene", "open_scenes", "OpenScene", "WholeSceneData", "CropData", "auto_grid", "scene_tile_layout",
           "has_labelled_pixel", "grid_fits", "grid_shapes", "fitting_grid", "band_order_problem",
           "classes_without_pixels"]
