"""Small raster files the data tests write (SYNTHETIC, made for tests only):
random cubes, GeoTIFF / HDF5 writers, and a labelled 3-band scene with its YAML."""
from __future__ import annotations

import numpy as np
import rasterio
import yaml
from affine import Affine

CRS = "EPSG:32633"
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
C, H, W = 5, 37, 29          # cube()'s default shape


def cube(dtype="float32", shape=(C, H, W), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1000, size=shape)
    return a.astype(dtype)


def write_raster(path, arr, driver="GTiff", nodata=None, crs=CRS, transform=TRANSFORM, **opts):
    c, h, w = arr.shape
    with rasterio.open(path, "w", driver=driver, width=w, height=h, count=c, dtype=arr.dtype.name, crs=crs,
                       transform=transform, nodata=nodata, **opts) as dst:
        dst.write(arr)
    return path


def write_h5(path, name, arr, chunks=None):
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=arr, chunks=chunks)
    return path


# --- a labelled scene: image, label and scene.yaml ----------------------------------------------
LABELLED_HW = (23, 31)
NODATA = -9999.0
CLASS_VALUES = [10, 20, 30]   # label values of classes a, b, c (0 unlabeled, 255 nodata)


def labelled_scene(tmp_path, *, label_crs=CRS, label_transform=TRANSFORM, label_shape=LABELLED_HW, extra=None,
                   image=None) -> tuple[str, np.ndarray, np.ndarray]:
    """A 3-band float32 GeoTIFF with nodata pixels, a uint8 label (values 10/20/30,
    0 = unlabeled, 255 = nodata) and scene.yaml; returns (yaml path, image, raw label)."""
    a = cube("float32", (3, *LABELLED_HW), seed=11) if image is None else image
    a[:, 0, :4] = NODATA                   # invalid pixels (all bands)
    a[1, 5, 7] = NODATA                    # invalid pixel (one band is enough)
    write_raster(tmp_path / "img.tif", a, nodata=NODATA)
    rng = np.random.default_rng(12)
    lab = rng.choice(np.array([0, 10, 20, 30, 255], np.uint8), size=label_shape, p=[0.05, 0.4, 0.3, 0.2, 0.05])
    write_raster(tmp_path / "lab.tif", lab[None], nodata=255, crs=label_crs, transform=label_transform)
    desc = {
        "name": "tiny",
        "image": {"path": "img.tif"},
        "band_names": ["red", "green", "nir"],
        "label": {"path": "lab.tif", "unlabeled": [0]},
        "classes": [{"value": 10, "name": "a", "color": "#ff0000"}, {"value": 20, "name": "b"},
                    {"value": 30, "name": "c", "color": [0, 0, 255]}],
        "regions": {"train": {"windows": [[0, 12, 0, 31]]}, "val": {"windows": [[12, 23, 0, 16], [12, 23, 16, 31]]}},
    }
    desc.update(extra or {})
    path = tmp_path / "scene.yaml"
    path.write_text(yaml.safe_dump(desc))
    return str(path), a, lab
