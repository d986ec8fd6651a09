"""Whole-scene data: scene descriptions, windowed readers, labels, normalisation,
rank-consistent augmentation and sample scenes (docs/design.md sections 5 and 6).

A rank reads only its own tile window from disk; see :mod:`rest_ds.data.tiles`
for the per-rank flow and :mod:`rest_ds.data.samples` for the real sample scenes
(``rest-ds data fetch NAME``) and their measured class histograms.
"""
from .augment import AugmentConfig, AugmentPlan, gaussian_field, plan_augmentation
from .errors import DataError, DataWarning
from .readers import (BandStackReader, HDF5Reader, IOCounter, MatReader, RasterReader, Reader, ReadRecord,
                      open_reader)
from .samples import (NC_LANDSAT7_CLASS_COUNTS, SAMPLES, default_cache_dir, fetch_sample, load_sample,
                      synthetic_hyperspectral, verify_sample)
from .scene import (IGNORE_INDEX, ClassInfo, ClassMap, LabelSource, Region, Scene, SceneReader, Source,
                    check_same_grid, open_scene)
from .stats import BandMoments, BandStats, SceneSummary, prepare_scene, scan_scene
from .tiles import SceneTile, WindowCache, read_rank_tile, read_tile, scene_layout

__all__ = [
    "AugmentConfig", "AugmentPlan", "gaussian_field", "plan_augmentation",
    "DataError", "DataWarning",
    "BandStackReader", "HDF5Reader", "IOCounter", "MatReader", "RasterReader", "Reader", "ReadRecord", "open_reader",
    "NC_LANDSAT7_CLASS_COUNTS", "SAMPLES", "default_cache_dir", "fetch_sample", "load_sample",
    "synthetic_hyperspectral", "verify_sample",
    "IGNORE_INDEX", "ClassInfo", "ClassMap", "LabelSource", "Region", "Scene", "SceneReader", "Source",
    "check_same_grid", "open_scene",
    "BandMoments", "BandStats", "SceneSummary", "prepare_scene", "scan_scene",
    "SceneTile", "WindowCache", "read_rank_tile", "read_tile", "scene_layout",
]
