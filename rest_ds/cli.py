"""The ``rest-ds`` command line.

``rest-ds verify TARGET --input-shape B,C,H,W --grid PHxPW`` runs a model
factory on ``PH x PW`` gloo ranks under SPIM and in one process on the same
input, and reports the relative error of every output, the input gradient and
every parameter gradient (with ``--train`` also every parameter and buffer after
one SGD step).

Exit status: 0 all checks within ``--tol``; 1 some check above it; 2 bad input
(unloadable target, malformed option, tiles too small, a rank that raised) or a
model that SPIM refuses.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .cli_args import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, fail, nonneg_float, one_line, parse_grid, positive_int


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit status 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --- argument types ------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``'2,3,256,256'`` -> ``(2, 3, 256, 256)`` (B, C, H, W; all >= 1)."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not B,C,H,W (four integers, e.g. 2,3,256,256)") from None
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"input shape '{text}' must be positive in every dim")
    return shape  # type: ignore[return-value]


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# --- verify ----------------------------------------------------------------------
VERIFY_DESCRIPTION = """\
Check that a model runs EXACTLY under SPIM.

TARGET is a factory returning an nn.Module, given as 'package.module:factory'
(e.g. rest_ds.models.zoo:resnet18_upernet) or 'path/to/file.py:factory'.
The factory is called with no arguments on every rank (weights are then
broadcast so every rank and the reference hold the same ones).

PHxPW gloo CPU ranks are started. Each builds the model, parallelizes it, runs
its tile of one random input (seeded by --seed) and back-propagates a fixed
random linear loss of the outputs; sp rank 0 also runs the unmodified model on
the whole input in one process, in float32 AND in float64 (same weights, input
and random draws), which measures how far rounding alone moves each quantity.
Reported per line: the relative error max|sharded - single| / max|single| of
each output, of the input gradient, of every parameter gradient and every
buffer, and with --train of every parameter after one SGD step (lr 0.1); the
reference's measured rounding noise (relative); and the check's class:
  PASS      error <= tol
  ROUNDING  error above tol but within 10x the reference's own rounding noise
            (an ill-conditioned quantity in this precision)
  ZERO-REF  the same for a quantity zero in exact arithmetic as measured (its
            float64 value is float64 rounding, e.g. the gradient of a bias
            feeding a train-mode BatchNorm): its relative error is noise over
            zero; |ref| is shown
  FP64-PASS above that bound in float32, but the same check passes when the
            whole comparison runs again in float64 (done automatically for a
            float32 run with such checks): exact; float32 rounding amplified
            by the model (e.g. a ReLU input near 0 that flips sign)
  FAIL      error above tol + 10x the measured noise, in float64 too: SPIM
            differs
Then the bytes sp rank 0 sent, per collective kind.

Exit status: 0 no check FAILs; 1 some check FAILs; 2 the model is refused by
SPIM (the message names the module and op), or bad input (target not
loadable, malformed option, tiles too small, a rank raised)."""

VERIFY_EPILOG = """\
examples:
  rest-ds verify rest_ds.models.zoo:resnet18_upernet --input-shape 2,3,256,256 --grid 2x2 --train
  rest-ds verify my_models.py:build --input-shape 1,6,97,131 --grid 1x3 --json report.json
  rest-ds verify my_models.py:build --train     (input 2 x C x 128 x 128, grid 1x2, C read off the model)"""


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify", help="check that a model computes the same output and gradients under SPIM as in one process",
        description=VERIFY_DESCRIPTION, epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="TARGET", help="model factory: 'package.module:factory' or 'path/to/file.py:factory'")
    p.add_argument("--input-shape", type=parse_shape, metavar="B,C,H,W",
                   help="shape of the whole (unsharded) random input, e.g. 2,3,256,256 (default: batch 2, "
                        "the model's declared in_chans / config.num_channels, else the in_channels of its "
                        "first layer that has them, 128 x 128 rounded up to "
                        "the alignment with at least one alignment unit per tile)")
    p.add_argument("--grid", type=parse_grid, default=(1, 2), metavar="PHxPW",
                   help="tile grid: PH rows x PW columns of ranks (PH*PW gloo processes), e.g. 2x2 or 1x3 "
                        "(default: 1x2)")
    p.add_argument("--train", action="store_true",
                   help="train mode (batch statistics in BatchNorm, dropout active) and compare the "
                        "parameters and buffers after one SGD step")
    p.add_argument("--tol", type=nonneg_float, default=1e-5,
                   help="relative error that passes outright; above it a check passes only within its "
                        "measured rounding noise (default: %(default)g)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the input and the loss (default: %(default)s)")
    p.add_argument("--align", type=positive_int, metavar="A",
                   help="tile borders on multiples of A input pixels; use the network's total stride "
                        "(e.g. 32 for ResNet + UPerNet) (default: the model's 'align' attribute where it "
                        "has one, as rest_ds's segmentors do, else 1)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of model and input (default: %(default)s); float64 checks the algorithm "
                        "free of fp32 rounding (its noise floor is estimated from the fp32 reference)")
    p.add_argument("--noise-floor", action="store_true", help=argparse.SUPPRESS)  # always on now; kept for old scripts
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where model and input live (default: %(default)s); with cuda all ranks share the "
                        "current GPU and gloo stages what they send through host memory, TF32 off")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("--timeout", type=positive_int, default=600, metavar="SECONDS",
                   help="kill the ranks after this many seconds (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of a failing rank")
    p.set_defaults(func=cmd_verify)


def _model_defaults(factory) -> tuple[int | None, int | None]:
    """``(input channels, alignment)`` read off the model ``factory()`` builds: the
    first declared input width (a module's ``in_chans``, a transformers
    ``config.num_channels``), else the ``in_channels`` of its first module that has
    one (the stem conv, the patch embedding's projection), and its ``align``
    attribute (None where absent)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        try:
            model = factory()
        except Exception:  # a factory that needs real tensors (e.g. loads weights): build it for real
            model = None
    if model is None:
        model = factory()
    # a declared input width first (timm's in_chans, transformers' config.num_channels): a patch
    # embedding written as a Linear (NaFlexViT) has no in_channels, and the first module that has
    # one may be a head deeper in
    declared = [getattr(m, "in_chans", None) for m in model.modules()]
    declared += [getattr(getattr(m, "config", None), "num_channels", None) for m in model.modules()]
    chans = next((int(c) for c in declared if isinstance(c, int) and not isinstance(c, bool) and c > 0), None)
    if chans is None:
        chans = next((int(m.in_channels) for m in model.modules()
                      if isinstance(getattr(m, "in_channels", None), int)), None)
    align = getattr(model, "align", None)
    return chans, int(align) if isinstance(align, int) and align > 0 else None


def _resolve_target(target: str) -> str:
    """Absolute file path for 'file.py:factory' targets, so ranks find the file whatever their cwd."""
    if ":" not in target:
        return target
    mod, fn = target.rsplit(":", 1)
    if mod.endswith(".py") or "/" in mod:
        return f"{Path(mod).resolve()}:{fn}"
    return target


def _fmt_err(v: float) -> str:
    return f"{v:.3e}" if math.isfinite(v) else str(v)


def _jsonable(v: float):
    return v if math.isfinite(v) else str(v)


def cmd_verify(args: argparse.Namespace) -> int:
    # A 'package.module' target that lives in the current directory should load as
    # with 'python -m'; the ranks' forkserver inherits sys.path from here.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from .spim.errors import SPIMError
    from .spim.spawn import RankError
    from .spim.tiling import TileLayout
    from .spim.verify import NOISE_K, load_factory, verify

    target = _resolve_target(args.target)
    try:
        load_factory(target)
    except SPIMError as e:
        return fail(e)
    except Exception as e:  # an import error, a syntax error in the user's file, ...
        if args.debug:
            import traceback
            traceback.print_exc()
        return fail(f"cannot load '{args.target}': {type(e).__name__}: {one_line(e)}")

    if args.json is not None and args.json.is_dir():
        return fail(f"--json {args.json} is a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda: torch sees no CUDA device on this machine")
    if args.input_shape is None or args.align is None:
        try:
            chans, align = _model_defaults(load_factory(target))
        except SPIMError as e:
            return fail(e)
        except Exception as e:  # the factory itself failed
            if args.debug:
                import traceback
                traceback.print_exc()
            return fail(f"'{args.target}': building the model failed: {type(e).__name__}: {one_line(e)}")
        if args.align is None:
            args.align = align or 1
        if args.input_shape is None:
            if chans is None:
                return fail(f"'{args.target}': no layer with in_channels to read the input's channels from; "
                            f"give --input-shape B,C,H,W")
            a, side = args.align, -(-128 // args.align) * args.align  # 128 rounded up to the alignment
            args.input_shape = (2, chans, max(side, a * args.grid[0]), max(side, a * args.grid[1]))
    B, C, H, W = args.input_shape
    ph, pw = args.grid
    try:
        layout = TileLayout.even(H, W, (ph, pw), args.align)
    except SPIMError as e:
        return fail(e)

    print(f"verify {args.target}: input {B}x{C}x{H}x{W}, grid {ph}x{pw} ({ph * pw} gloo ranks on {args.device}), "
          f"{'train' if args.train else 'eval'} mode, tile rows {list(layout.rows)} cols {list(layout.cols)}",
          flush=True)
    t0 = time.monotonic()
    try:
        report = verify(target, (B, C, H, W), (ph, pw), train=args.train, seed=args.seed, align=args.align,
                        timeout_s=args.timeout, dtype=getattr(torch, args.dtype), noise_floor=True,
                        device=args.device, confirm_tol=args.tol)
    except RankError as e:
        if args.debug and e.tb:
            print(e.tb, file=sys.stderr)
        who = f"rank {e.rank}" if e.rank >= 0 else "ranks"
        return fail(f"{who}: {e.exc_type}: {one_line(e.message)}")
    elapsed = time.monotonic() - t0

    if report.refused is not None:
        print(f"REFUSED: {report.refused}")
        _write_json(args, report, elapsed, status="refused")
        return EXIT_USAGE

    tol = args.tol
    errors = report.errors
    classes = report.classify(tol)
    width = max([len(k) for k in errors] + [len("check")])
    floor = report.noise_floor
    print(f"{'check':<{width}}  {'rel. error':>10}  {'ref noise':>10}  class")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 10}  --------")
    for name, v in errors.items():
        c = classes[name]
        extra = f"  (|ref| {report.sizes[name]:.1e})" if c == "ZERO-REF" else \
            f"  (float64: {_fmt_err(report.float64.errors[name])})" if c == "FP64-PASS" else ""
        print(f"{name:<{width}}  {_fmt_err(v):>10}  {_fmt_err(floor[name]) if name in floor else '-':>10}  {c}{extra}")
    print(f"(ref noise: how far {report.dtype} rounding alone moves the one-process result, measured from its "
          f"float32 and float64 runs{'; float64: scaled by eps64/eps32' if report.dtype == 'float64' else ''})")
    if report.float64 is not None:
        n64 = sum(1 for c in classes.values() if c == "FP64-PASS")
        print(f"(checks above the float32 bound were run again in float64: {n64} pass there (FP64-PASS: exact, "
              f"float32 rounding amplified by the model, e.g. a ReLU input that flips sign), "
              f"{len(report.failures(tol))} fail there too)")
    print()
    print("bytes sent by sp rank 0 (forward + backward + gradient average):")
    if report.comm_bytes:
        for kind, n in sorted(report.comm_bytes.items()):
            print(f"  {kind:<12} {human_bytes(n):>10}")
        print(f"  {'total':<12} {human_bytes(sum(report.comm_bytes.values())):>10}")
    else:
        print("  none")
    print()
    fails = report.failures(tol)
    if not errors:
        print(f"FAIL: nothing was compared (the model produced no tensor output) [{elapsed:.1f} s]")
        _write_json(args, report, elapsed, status="fail")
        return EXIT_FAIL
    counts = ", ".join(f"{sum(1 for c in classes.values() if c == k)} {k}"
                       for k in ("PASS", "ROUNDING", "ZERO-REF", "FP64-PASS") if any(c == k for c in classes.values()))
    judged = [k for k in errors if classes[k] in ("PASS", "ROUNDING", "FAIL")]
    worst = max(judged or errors, key=lambda k: errors[k] if math.isfinite(errors[k]) else math.inf)
    if fails:
        worst = max(fails, key=lambda k: errors[k] if math.isfinite(errors[k]) else math.inf)
        print(f"FAIL: {len(fails)} of {len(errors)} checks FAIL (error above tol {tol:g} + {NOISE_K:g}x the "
              f"measured rounding noise; max {_fmt_err(errors[worst])} at '{worst}'); the others: {counts} "
              f"[{elapsed:.1f} s]")
        _write_json(args, report, elapsed, status="fail")
        return EXIT_FAIL
    print(f"PASS: {len(errors)} checks: {counts} at tol {tol:g} (max error {_fmt_err(errors[worst])} at "
          f"'{worst}', ZERO-REF{' and FP64-PASS' if report.float64 is not None else ''} excluded) [{elapsed:.1f} s]")
    _write_json(args, report, elapsed, status="pass")
    return EXIT_OK


def _write_json(args, report, elapsed: float, status: str) -> None:
    if args.json is None:
        return
    from .spim.verify import NOISE_K

    data = {
        "target": args.target,
        "input_shape": list(args.input_shape),
        "grid": list(args.grid),
        "train": args.train,
        "tol": args.tol,
        "seed": args.seed,
        "align": args.align,
        "status": status,
        "refused": report.refused,
        "layout": {"rows": list(report.layout[0]), "cols": list(report.layout[1])} if report.layout else None,
        "dtype": args.dtype,
        "errors": {k: _jsonable(v) for k, v in report.errors.items()},
        "noise_floor": {k: _jsonable(v) for k, v in report.noise_floor.items()},
        "noise_k": NOISE_K,
        "checks": {k: {"class": c, "rel_error": _jsonable(report.errors[k]),
                       "abs_error": _jsonable(report.abs_errors[k]) if k in report.abs_errors else None,
                       "ref_size": report.sizes.get(k), "ref_noise": report.noise_abs.get(k),
                       "ref64_size": report.ref64_sizes.get(k),
                       "float64_rel_error": _jsonable(report.float64.errors[k]) if c == "FP64-PASS" else None}
                   for k, c in (report.classify(args.tol).items() if report.refused is None else ())},
        "failures": sorted(report.failures(args.tol)) if report.refused is None else [],
        "comm_bytes": dict(report.comm_bytes),
        "seconds": round(elapsed, 3),
    }
    try:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as e:
        print(f"error: cannot write the JSON report to '{args.json}': {e.strerror or e}", file=sys.stderr)


# --- entry point -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rest-ds",
        description="rest_ds: whole-scene remote-sensing segmentation with SPIM, exact spatial parallelism "
                    "over a grid of tiles.",
        epilog="run 'rest-ds COMMAND --help' for the options of a command",
    )
    parser.add_argument("--version", action="version", version=f"rest-ds {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    _add_verify(sub)
    from .data import cli as data_cli

    data_cli.add_parser(sub)
    from .train import cli as train_cli

    train_cli.add_parser(sub)
    from .train import bench as bench_cli

    bench_cli.add_parser(sub)
    from .train import plan as plan_cli

    plan_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse gives a positional list one run of words: KEY=VALUE overrides after an option
        # (`--check --ranks 2 mesh.grid=2x1`) come back here and belong to the same list, in order
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        rc = EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (`rest-ds data info X | head`): stop quietly, as cat does;
        # stdout to /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    if rc == EXIT_INTERRUPTED and os.environ.get("RANK", "0") == "0":
        # one line, not a traceback nor silence: what a user who pressed Ctrl-C needs to know
        print(f"rest-ds {args.command}: interrupted", file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
