"""``rest-ds train``, ``rest-ds segment`` and ``rest-ds export``.

Wiring (in ``rest_ds/cli.py``)::

    from .train import cli as train_cli
    train_cli.add_parser(sub)       # registers train, segment, export

Exit status: 0 success; 1 a failure while running (a rank raised, a peer died or
stalled; the message names the rank); 2 bad input (config key or value, missing
file, unusable or damaged checkpoint, an output that would destroy an input, an
output folder in use by another run), with one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..cli_args import (EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, fail, nonneg_int, one_line, parse_grid,
                        positive_float, positive_int)

TRAIN_DESCRIPTION = """\
Train a segmentation model on whole scenes (SPIM spatial parallelism inside
DeepSpeed data parallelism) or, with data.mode=crop, the cropping baseline.

Start it with a launcher; each rank runs this command:

  deepspeed --num_gpus 2 --no_local_rank --module rest_ds train --config configs/NAME.yaml
  torchrun --nproc_per_node 2 -m rest_ds train --config configs/NAME.yaml
  srun python -m rest_ds train --config configs/NAME.yaml   (MASTER_ADDR/PORT set; launch/sbatch.slurm)

(on CPU the deepspeed launcher's --num_gpus is the number of CPU ranks; see
launch/). Without a launcher it runs as one rank. gloo on CPU, nccl on GPU;
torch threads per rank: train.threads, else OMP_NUM_THREADS, else the cores
divided by the ranks on the node.

Before a long queue wait: 'rest-ds train --check --config FILE --ranks N
[--memory GIB]' checks the config, encoder arguments, scene headers, grid and
output folder in seconds, without starting ranks, and prints the memory plan
(rest-ds plan); bad input exits 2 with one line naming the file and key.

KEY=VALUE arguments override config keys (dotted, YAML values), e.g.
  train.steps=200 optimizer.lr=3e-4 mesh.grid=2x1 deepspeed.zero_stage=3
Every key is validated: an unknown key or a bad value is named in the error.

Writes into output_dir (default runs/NAME): train_log.csv, eval_log.csv,
metrics.json, training_curve.png and checkpoints/ (DeepSpeed, atomic,
checksummed; a second run with train.resume=auto continues from the latest
complete one, applying changed steps/lr/schedule with a notice and refusing a
changed model). One run at a time per output_dir (output_dir/.rest_ds.lock)."""

SEGMENT_DESCRIPTION = """\
Segment a whole scene into a georeferenced GeoTIFF with an exported model.

INPUT is a sample name (nc-landsat7), a scene YAML or a raster file (GeoTIFF,
...). Each of the P ranks reads and writes only its tile. --mode whole (REST,
default) runs the model on the whole scene split over the ranks (probabilities
equal to fp32 rounding for any P; the map can differ only where the top two
classes tie within that rounding, measured 0 of 135,092 pixels on nc-landsat7
at P = 2, 3, 4 vs 1); --mode slide is the cropping baseline (windows of --crop
px with --overlap px, logits averaged).

P ranks: under a launcher (deepspeed / torchrun / srun, as for train), or
--nproc P local gloo ranks, else one process.

Output: uint8 class map (input CRS and transform, nodata 255 where the input is
nodata, colour table, class names in the metadata, tiled and compressed);
--probs: float32 per-class probabilities; --preview: a PNG of the map.
Outputs are checked before any compute: GeoTIFFs are named .tif/.tiff, none
may be an input file or another output, an existing one needs --overwrite."""

EXPORT_DESCRIPTION = """\
Consolidate a DeepSpeed training checkpoint (any ZeRO stage, any number of
ranks) into one .safetensors file plus a .json (model config, classes,
normalisation, bands), the input of 'rest-ds segment' on any number of ranks.

CHECKPOINT is a run folder, its checkpoints/ folder (the latest complete
checkpoint is used) or one checkpoints/step_N/ folder. An existing export at
--output is replaced only with --overwrite."""


def add_parser(subparsers) -> None:
    """Register ``train``, ``segment`` and ``export`` on ``subparsers``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("train", help="train on whole scenes (or crops) with DeepSpeed and SPIM",
                              description=TRAIN_DESCRIPTION, formatter_class=fmt)
    p.add_argument("--config", required=True, type=Path, metavar="YAML", help="training config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    p.add_argument("--print-config", action="store_true", help="print the validated config (defaults filled in) and exit")
    p.add_argument("--check", "--dry-run", action="store_true",
                   help="preflight without starting the ranks: config, encoder arguments, scene headers (bands, "
                        "labels, classes, regions), grid vs scene, output folder; then the memory plan (rest-ds plan)")
    p.add_argument("--ranks", type=positive_int, metavar="N", help="with --check: ranks of the run (default: "
                                                                    "$WORLD_SIZE, mesh.sp or 1)")
    p.add_argument("--memory", type=positive_float, metavar="GIB", help="with --check: memory per device for the plan")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("segment", help="segment a whole scene into a georeferenced GeoTIFF",
                              description=SEGMENT_DESCRIPTION, formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, metavar="MODEL",
                   help="exported model: NAME.safetensors (with NAME.json beside it) or its folder")
    p.add_argument("--input", required=True, metavar="SCENE", action="append",
                   help="sample name, scene YAML or raster file; repeat it, or give a folder, a quoted glob or "
                        "@LIST.txt (one scene a line) to segment many scenes in one launch")
    p.add_argument("--output", required=True, type=Path, metavar="MAP.tif",
                   help="output class map (GeoTIFF); with several scenes a folder: one NAME.tif per scene, "
                        "scenes already done there (segment_batch.json) are skipped on a rerun")
    p.add_argument("--mode", choices=("whole", "slide"), default="whole",
                   help="whole: REST whole-scene inference (default); slide: sliding-window baseline")
    p.add_argument("--crop", type=positive_int, metavar="N", help="slide: window size (default: the training crop size)")
    p.add_argument("--overlap", type=nonneg_int, metavar="M",
                   help="slide: window overlap (default: the training run's at its crop size, else crop/4)")
    p.add_argument("--probs", type=Path, metavar="PROBS.tif", help="also write per-class probabilities (float32)")
    p.add_argument("--preview", type=Path, metavar="PNG", help="also write a PNG preview of the map")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (refused otherwise)")
    p.add_argument("--grid", metavar="PHxPW",
                   help="tile grid of the ranks (default: the smallest largest tile, then the least halo traffic)")
    p.add_argument("--stats", choices=("model", "scene"), default="model",
                   help="normalisation: the training statistics stored with the model (default) or the input "
                        "scene's own (scanned once, cached)")
    p.add_argument("--values", choices=("auto", "raw", "ids"), default="auto",
                   help="pixel values: the classes' raw label values (auto: when integers in 0..254) or ids 0..K-1")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="P",
                   help="without a launcher: run P local gloo ranks (default 1)")
    p.add_argument("--cache", metavar="DIR", help="sample cache (default: $REST_DS_DATA or ~/.cache/rest_ds)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch threads per rank (default: $OMP_NUM_THREADS or 1)")
    p.add_argument("--timeout", type=positive_int, default=1800, metavar="SECONDS",
                   help="with --nproc: stop the ranks after this long (default %(default)s)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_segment)

    p = subparsers.add_parser("export", help="consolidate a training checkpoint into safetensors + JSON",
                              description=EXPORT_DESCRIPTION, formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CHECKPOINT",
                   help="run folder, checkpoints/ folder or checkpoints/step_N/ folder")
    p.add_argument("--output", required=True, type=Path, metavar="MODEL.safetensors",
                   help="output weights (the .json is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export (refused otherwise)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    p.set_defaults(func=cmd_export)


def _usage_errors():
    from ..data import DataError
    from ..spim import SPIMError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .lock import RunLockError

    return (ConfigError, DataError, CheckpointError, SPIMError, FileNotFoundError, RunLockError)


def _rank_env() -> tuple[int, int]:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    return rank, world


def _die(e: BaseException, debug: bool, rank: int, world: int) -> int:
    """Report a rank's error; in a multi-rank job exit at once (the peers may be
    blocked in a collective: the launcher stops them, or their collective timeout)."""
    # a peer that died or stalled is a failure of the run, not bad input (even when SPIM reports it)
    code = EXIT_USAGE if isinstance(e, _usage_errors()) and not _peer_lost(e) else EXIT_FAIL
    if debug:
        import traceback
        traceback.print_exc()
    who = f"rank {rank}: " if world > 1 else ""
    text = one_line(e)
    if world > 1 and _peer_lost(e):
        text = f"a collective failed: another rank stopped or timed out (its error comes first) [{text[:300]}]"
    print(f"error: {who}{type(e).__name__}: {text}", file=sys.stderr, flush=True)
    if world > 1:
        sys.stdout.flush()
        os._exit(code)
    return code


def _peer_lost(e: BaseException) -> bool:
    """A collective that failed because a peer died or never arrived (gloo/nccl wording)."""
    t = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in t for k in (
        "connection closed by peer", "connection reset", "timed out", "timeout", "broken pipe", "nccl error",
        "has exited while"))


# --- train --------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    rank, world = _rank_env()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(e) if world == 1 or rank == 0 else EXIT_USAGE
    if args.print_config:
        if rank == 0:
            print(cfg.to_yaml(), end="")
        return EXIT_OK
    if args.check:
        return _check(cfg, args, world)
    lock = None
    try:
        # seconds, on every rank, before torch.distributed and DeepSpeed start
        from .preflight import check_encoder_kwargs, check_resume_scenes, scene_headers
        from .validation import check_train_config

        check_train_config(cfg, world_size=world)
        check_encoder_kwargs(cfg)
        check_resume_scenes(cfg, scene_headers(cfg))  # headers only; samples not fetched yet are left to rank 0
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        return fail(e) if world == 1 or rank == 0 else EXIT_USAGE
    try:
        from .engine import Trainer, init_job

        rank, world = init_job()
        lock = _lock_output(cfg.out_dir, rank, world)
        trainer = Trainer(cfg)
        summary = trainer.fit()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and world == 1:
            if lock is not None:
                lock.release()
            return EXIT_INTERRUPTED
        if lock is not None:
            lock.release()
        return _die(e, args.debug, rank, world)
    if lock is not None:
        lock.release()
    if rank == 0:
        ev = summary.get("eval") or {}
        tail = f", val mIoU {ev['mIoU']:.4f}" if ev.get("mIoU") is not None else ""
        loss = f", final loss {summary['final_loss']:.4f}" if summary.get("final_loss") is not None else ""
        ran = summary["steps"] - summary["start_step"]
        print(f"done: {ran} step(s) ({summary['start_step']}->{summary['steps']}) in {summary['train_seconds']:.1f} s "
              f"(setup {summary['setup_seconds']:.1f} s){loss}{tail}; output {cfg.out_dir}", flush=True)
    _finish()
    return EXIT_OK


def _lock_output(out_dir, rank: int, world: int):
    """Rank 0 locks ``out_dir`` (lock.py); every rank raises the same error if it cannot."""
    import torch.distributed as dist

    from .lock import acquire_run_lock

    res: list = [None]
    if rank == 0:
        try:
            res[0] = acquire_run_lock(out_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
        except BaseException as e:
            res[0] = e
    if world > 1:
        sent = [res[0] if isinstance(res[0], BaseException) else None]
        dist.broadcast_object_list(sent, src=0)
        if rank != 0:
            res = sent
    if isinstance(res[0], BaseException):
        raise res[0]
    return res[0]


def _check(cfg, args: argparse.Namespace, world: int) -> int:
    """``train --check``: the preflight and the plan, in this process (no ranks)."""
    t0 = time.monotonic()
    try:
        from .plan import GIB, device_memory_bytes, format_plan, plan_run
        from .preflight import preflight

        ranks = args.ranks or (world if world > 1 else None) or cfg.mesh.sp or 1
        info = preflight(cfg, ranks)
        from .validation import check_resume

        # as the launched run: a checkpoint of another rank count is refused (when the count is known)
        check_resume(cfg, world_size=args.ranks or (world if world > 1 else None))
        mem = args.memory * GIB if args.memory else device_memory_bytes()
        plan = plan_run(cfg, ranks=ranks, memory_bytes=mem, scenes=info)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        from .config import ConfigError

        if isinstance(e, ConfigError) and e.where is None:  # raised where the file is not known (the plan's model)
            e = ConfigError(cfg.source_file, e.key, e.message)
        return _die(e, args.debug, 0, 1)
    seen = [s for s in info["scenes"] if s["fetched"]]
    print(f"check: config {cfg.source_file}: OK; {len(info['scenes'])} scene(s) "
          + ", ".join(f"{s['name']} {s['bands']}x{s['height']}x{s['width']}" for s in seen)
          + f"; {info['in_chans']} bands, {info['num_classes']} classes; output {cfg.out_dir} writable; "
            f"grid {plan['configured']['grid'][0]}x{plan['configured']['grid'][1]} on {ranks} rank(s) "
            f"[{time.monotonic() - t0:.1f} s]", flush=True)
    print(format_plan(plan), flush=True)
    conf = plan["configured"]
    if mem is not None and conf["peak_bytes"] > 0.9 * mem:
        print(f"warning: the configured run needs about {conf['peak_bytes'] / GIB:.2f} GiB per rank, more than 90% of "
              f"{mem / GIB:.1f} GiB", flush=True)
    return EXIT_OK


def _finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass


# --- segment ----------------------------------------------------------------------------------------
def cmd_segment(args: argparse.Namespace) -> int:
    grid = None
    if args.grid:
        try:
            grid = parse_grid(args.grid)
        except ValueError as e:
            return fail(f"--grid: {e}")
    if args.overlap is not None and args.crop is not None and args.overlap >= args.crop:
        return fail(f"--overlap {args.overlap} must be smaller than --crop {args.crop}")
    batch = len(args.input) > 1 or any(_many_scenes(r) for r in args.input)
    if batch:
        try:
            from .segment import batch_outputs, expand_inputs

            scenes = expand_inputs(args.input)
            batch_outputs(scenes, str(args.output))
        except ValueError as e:
            return fail(e)
        if args.probs or args.preview:
            return fail("--probs / --preview: one scene at a time (several inputs write one map per scene)")
        if args.output.suffix.lower() in (".tif", ".tiff") or args.output.is_file():
            return fail(f"--output {args.output}: with several scenes it is a folder (one NAME.tif per scene)")
    kwargs = dict(checkpoint=str(args.checkpoint), input=str(args.input[0]), output=str(args.output), mode=args.mode,
                  crop=args.crop, overlap=args.overlap, probs=str(args.probs) if args.probs else None,
                  preview=str(args.preview) if args.preview else None, grid=grid, stats=args.stats,
                  cache=args.cache, values=args.values, threads=args.threads, overwrite=args.overwrite)
    try:  # before any rank starts: outputs that would destroy an input, unwritable folders, ...
        from ..data import DataError
        from .segment import check_outputs

        if batch:
            from .segment import BATCH_MANIFEST

            try:
                man = json.loads((args.output / BATCH_MANIFEST).read_text())
            except (OSError, ValueError):
                man = {}
            for ref, out in zip(scenes, batch_outputs(scenes, str(args.output))):
                st = (man.get(out.name) or {}).get("status")
                if args.overwrite or st != "done" or not out.is_file():
                    check_outputs(ref, str(out), overwrite=args.overwrite or st in ("started", "done"),
                                  cache=args.cache)
            del kwargs["input"], kwargs["probs"], kwargs["preview"]
            kwargs["inputs"] = scenes
        else:
            check_outputs(kwargs["input"], kwargs["output"], probs=kwargs["probs"], preview=kwargs["preview"],
                          overwrite=args.overwrite, cache=args.cache)
    except DataError as e:
        return fail(e)
    rank, world = _rank_env()
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if launched and args.nproc > 1:
        return fail("--nproc starts local ranks; do not combine it with a launcher")
    ranks = world if launched else args.nproc
    if grid is not None and grid[0] * grid[1] != ranks:  # before any rank starts (else a SPIMError from each rank)
        return fail(f"--grid {args.grid}: {grid[0] * grid[1]} tiles but the job has {ranks} rank(s) "
                    f"({'the launcher' if launched else '--nproc'}); give a grid of {ranks} tiles")
    if not launched and args.nproc > 1:
        from ..spim.spawn import RankError, spawn
        from .segment import _segment_rank

        # a relative path must mean the same in the ranks, whatever their cwd
        for k in ("checkpoint", "output", "probs", "preview"):
            if kwargs.get(k):
                kwargs[k] = os.path.abspath(kwargs[k])
        if batch:
            kwargs["inputs"] = [os.path.abspath(r) if os.path.exists(r) else r for r in kwargs["inputs"]]
        elif os.path.exists(kwargs["input"]):
            kwargs["input"] = os.path.abspath(kwargs["input"])
        try:
            res = spawn(_segment_rank, args.nproc, kwargs, threads=args.threads or 1, timeout_s=args.timeout)
        except RankError as e:
            if args.debug and e.tb:
                print(e.tb, file=sys.stderr)
            who = f"rank {e.rank}: " if e.rank >= 0 else ""
            bad_input = e.exc_type in {t.__name__ for t in _usage_errors()}   # one exit status for bad input
            return fail(f"{who}{e.exc_type}: {one_line(e.message)}", EXIT_USAGE if bad_input else EXIT_FAIL)
        _print_segment(res[0])
        return EXIT_OK
    try:
        from .segment import segment

        if launched:  # torch.distributed only: inference needs no DeepSpeed
            import torch.distributed as dist

            from ..spim import init_distributed
            init_distributed()
            rank, world = dist.get_rank(), dist.get_world_size()
        if batch:
            from .segment import segment_batch

            res = segment_batch(**kwargs)
        else:
            res = segment(**kwargs)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and world == 1:
            return EXIT_INTERRUPTED
        return _die(e, args.debug, rank, world)
    if rank == 0:
        _print_segment(res)
    _finish()
    return EXIT_OK


def _many_scenes(ref: str) -> bool:
    """A --input value that names several scenes: @LIST, a glob, a folder without scene.yaml."""
    p = Path(ref)
    return ref.startswith("@") or any(c in ref for c in "*?[") or (p.is_dir() and not (p / "scene.yaml").is_file())


def _print_segment(res: dict) -> None:
    if "done" in res:  # a batch
        for r in res["results"]:
            _print_segment(r)
        print(f"segment: {len(res['done'])} scene(s) done, {len(res['skipped'])} already done (skipped) -> "
              f"{res['output']} on {res['ranks']} rank(s) [{res['seconds']:.1f} s]", flush=True)
        return
    g = res["grid"]
    print(f"segment: {res['mode']} on {res['ranks']} rank(s), grid {g[0]}x{g[1]}, {res['shape'][0]}x{res['shape'][1]} px "
          f"-> {res['output']} [{res['seconds']:.1f} s]", flush=True)


# --- export ----------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        from .checkpoint import consolidated_state_dict, export_model, export_paths, select_checkpoint
        from .engine import quiet_deepspeed

        quiet_deepspeed()
        from ..data.samples import unwritable_folder
        from .checkpoint import CheckpointError

        blocked = unwritable_folder(args.output)   # found before the consolidation, not after
        if args.output.is_dir() or blocked is not None:
            why = "it is a folder" if blocked is None else f"{blocked} is not a writable folder"
            raise CheckpointError(f"{args.output}: --output cannot be written ({why})")
        existing = [p for p in export_paths(args.output) if p.exists()]
        if existing and not args.overwrite:   # as segment does: an export is not replaced by accident
            raise CheckpointError(f"{existing[0]} exists; pass --overwrite to replace it")

        root, tag, manifest = select_checkpoint(args.checkpoint, fallback=False)
        sd = consolidated_state_dict(root, tag, manifest)
        lora = ((manifest.get("config") or {}).get("finetune") or {}).get("lora")
        if lora:  # LoRA adapters merged into plain weights: the export is the plain model
            from .finetune import merge_lora

            sd = merge_lora(sd, lora["r"], lora["alpha"])
        meta = export_meta(manifest)
        # the weights must fit the model they claim to be
        from .segment import CheckpointError, exported_model_config
        from .engine import build_model

        model, _ = build_model(exported_model_config(meta["model"]), num_classes=meta["num_classes"],
                               in_chans=meta["in_chans"])
        res = model.load_state_dict(sd, strict=False)
        if res.missing_keys or res.unexpected_keys:
            raise CheckpointError(f"{root / tag}: consolidated weights do not match the model config "
                                  f"(missing {res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]})")
        out, js = export_model(sd, meta, args.output)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        return _die(e, args.debug, 0, 1)
    n = sum(v.numel() for v in sd.values())
    print(f"export {root / tag} (step {manifest['step']}, ZeRO {manifest.get('zero_stage')}, "
          f"{manifest.get('world_size')} ranks) -> {out} + {js.name}: {len(sd)} tensors, {n / 1e6:.2f} M values "
          f"[{time.monotonic() - t0:.1f} s]", flush=True)
    return EXIT_OK


def export_meta(manifest: dict) -> dict:
    """The JSON fields of an exported model, from a checkpoint manifest."""
    keys = ("model", "align", "num_classes", "in_chans", "classes", "ignore_index", "band_names", "normalization",
            "mode", "crop_size", "slide_overlap", "step", "train_scenes")
    meta = {k: manifest.get(k) for k in keys}
    meta["trained_with"] = {"zero_stage": manifest.get("zero_stage"), "world_size": manifest.get("world_size"),
                            "mesh": manifest.get("mesh"), "name": (manifest.get("config") or {}).get("name")}
    return meta


__all__ = ["add_parser", "cmd_train", "cmd_segment", "cmd_export", "export_meta"]
