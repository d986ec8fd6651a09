"""Training checkpoints (DeepSpeed, atomic) and exported models (safetensors + JSON).

Checkpoint layout (``<output_dir>/checkpoints/``)::

    latest                   # the tag of the newest complete checkpoint (written last, atomically)
    zero_to_fp32.py          # DeepSpeed's offline consolidation script (works with 'latest')
    step_0000050/            # DeepSpeed's files (model states, ZeRO partitions, scheduler) +
        rest_ds.json         #   our manifest: step, config, classes, statistics (written last)
        rest_ds_rank{r}.pt   #   per-rank random generator states
    .partial/                # checkpoints being written

**Atomic writes**: every rank writes into ``.partial/<tag>/``; after a barrier,
rank 0 writes the manifest, renames the folder to ``<tag>/`` (one ``rename``,
atomic on POSIX) and then replaces ``latest`` (write + fsync + ``os.replace``).
A crash at any point leaves either the previous checkpoint as ``latest`` or
the new one complete; a folder without a manifest is never loaded, and
``.partial/`` is cleared by the next save. (The checkpoint folder must be on a
file system all ranks share.)

**Export** (``rest-ds export``): the DeepSpeed checkpoint is consolidated
(``zero_to_fp32`` for ZeRO 1-3, the model-states file for stage 0) into one
``.safetensors`` file plus a ``.json`` with the model config, classes,
normalisation statistics and band names: everything ``rest-ds segment`` needs,
on any number of ranks. The JSON is written after the weights and records
their sha256, so a mismatched pair is refused.

**Loading never runs code from a file.** Checkpoints are shared between users,
and a pickle can run anything when loaded. rest_ds's own files are read with
``torch.load(weights_only=True)``; DeepSpeed's files (``*_model_states.pt``,
``*_optim_states.pt``) are read inside :func:`safe_loading`, which turns every
``torch.load`` made meanwhile (DeepSpeed's ``engine.load_checkpoint``, its
``zero_to_fp32``) into a ``weights_only`` load that accepts, besides tensors and
containers, only the few plain DeepSpeed types it pickles
(:data:`DEEPSPEED_SAFE_GLOBALS`). Anything else is refused with an error naming
the file and the type. The manifest records every file's size and sha256
(:func:`verify_checkpoint`), so a damaged or truncated file is named before
DeepSpeed reads it, and ``train.resume=auto`` falls back to the previous
complete checkpoint (:func:`select_checkpoint`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..cli_args import one_line
from ..data.samples import chmod_like_open, sha256_file
from .deepspeed_compat import CHECKPOINT_GLOBALS, checkpoint_globals, fp32_state_dict

MANIFEST = "rest_ds.json"
EXPORT_FORMAT = "rest_ds-model/1"
CKPT_FORMAT = "rest_ds-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint or exported model that cannot be used; the message names the path."""


class NoCheckpoint(CheckpointError):
    """Nothing to resume from: no such folder, or no complete checkpoint in it (unlike a
    damaged one, which ``train.resume=auto`` must not silently start over from)."""


# --- atomic file helpers -------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary file beside ``path`` that replaces it when the block ends
    without error and is removed otherwise (readers never see a partial file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        chmod_like_open(tmp)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with _replacing(Path(path)) as tmp:
        torch.save(obj, tmp)


# --- loading without running code -----------------------------------------------------------------
#: The non-tensor types DeepSpeed pickles into its checkpoint files: plain data classes
#: (deepspeed_compat.CHECKPOINT_GLOBALS, which says how they were found).
DEEPSPEED_SAFE_GLOBALS = CHECKPOINT_GLOBALS
_TORCH_LOAD: Callable = torch.load   # the real torch.load, whatever safe_loading() does to the module


def _safe_globals() -> list:
    # another DeepSpeed version without one of them: warned, and its files are refused by name
    return checkpoint_globals()


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing :data:`DEEPSPEED_SAFE_GLOBALS`.

    Raises :class:`CheckpointError` naming ``path``: for a file that pickles any
    other type (it could run code: never loaded), and for a damaged, truncated or
    missing file."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e))
        what = f"the type {m.group(1)}" if m else "a type"
        raise CheckpointError(f"{path}: refused: it pickles {what}, which is not on rest_ds's allow-list of "
                              f"checkpoint types (loading it could run code from the file; was it made by "
                              f"another program or modified?)") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged or truncated, cannot be read ({type(e).__name__}: "
                              f"{one_line(e)[:200]})") from None


def scan_checkpoint(folder: Path) -> None:
    """Without unpickling anything: raise :class:`CheckpointError` naming the first
    ``.pt`` file of ``folder`` that pickles a type outside the allow-list (cheap: only
    each file's pickle stream is read, so a job refuses it before starting up).
    Unreadable files are left to :func:`verify_checkpoint` and the loader."""
    allowed = set(DEEPSPEED_SAFE_GLOBALS)
    for f in sorted(folder.glob("*.pt")):
        try:
            bad = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(f) if g not in allowed]
        except Exception:  # damaged: named by verify_checkpoint or safe_torch_load
            continue
        if bad:
            raise CheckpointError(f"{f}: refused: it pickles the type {bad[0]}, which is not on rest_ds's "
                                  f"allow-list of checkpoint types (loading it could run code from the file; "
                                  f"was it made by another program or modified?)")


@contextlib.contextmanager
def safe_loading():
    """Within the block every ``torch.load`` (DeepSpeed's ``engine.load_checkpoint``,
    ``zero_to_fp32``, ...) is :func:`safe_torch_load`, whatever ``weights_only``
    its caller asks for. Not thread-safe: it swaps ``torch.load`` process-wide."""

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        return safe_torch_load(f, map_location=map_location, mmap=mmap)

    saved = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = saved


# --- checkpoint integrity ----------------------------------------------------------------------------
def file_record(folder: Path) -> dict[str, list]:
    """``{name: [size, sha256]}`` of the files in a checkpoint folder (the manifest's ``files``)."""
    return {f.name: [f.stat().st_size, sha256_file(f)] for f in sorted(folder.iterdir())
            if f.is_file() and f.name != MANIFEST}


def verify_checkpoint(root: Path, tag: str, manifest: dict) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``root/tag`` that is
    missing or whose size or sha256 differs from the manifest (checkpoints
    written before the manifest recorded them pass unchecked)."""
    for name, (size, sha) in (manifest.get("files") or {}).items():
        f = root / tag / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        got = f.stat().st_size
        if got != size:
            raise CheckpointError(f"{f}: damaged: {got} bytes, the manifest says {size} (truncated?)")
        if sha256_file(f) != sha:
            raise CheckpointError(f"{f}: damaged: its sha256 differs from the manifest's")


def select_checkpoint(path: str | os.PathLike, *, fallback: bool, log: Callable[[str], None] | None = None
                      ) -> tuple[Path, str, dict]:
    """:func:`find_checkpoint` and :func:`verify_checkpoint`. With ``fallback``, a
    damaged newest checkpoint is skipped for the newest older complete one (with a
    notice to ``log``); else its error is raised."""
    tag = None
    try:
        root, tag, manifest = find_checkpoint(path)
        verify_checkpoint(root, tag, manifest)
        return root, tag, manifest
    except NoCheckpoint:
        raise
    except CheckpointError as e:
        if not fallback or (Path(path) / MANIFEST).is_file():  # an explicit step folder: no other choice
            raise
        first = e
    if tag is None:  # the newest checkpoint's manifest is unreadable: every complete-looking one is a candidate
        root = Path(path)
        if (root / "checkpoints").is_dir() and not (root / "latest").exists():
            root = root / "checkpoints"
    for step, folder in reversed(list_checkpoints(root)):
        if tag is not None and folder.name >= tag:
            continue
        try:
            _, t, m = find_checkpoint(folder)
            verify_checkpoint(root, t, m)
        except CheckpointError as e:
            if log and str(e) != str(first):  # (the newest one's error comes in the notice below)
                log(f"notice: skipping checkpoint {folder}: {e}")
            continue
        if log:
            log(f"notice: the latest checkpoint is damaged ({first}); resuming from the previous complete one, "
                f"{folder} (step {step})")
        return root, t, m
    raise first


# --- training checkpoints ------------------------------------------------------------------------
def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (folders with a manifest), oldest first."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).is_file():
            try:
                out.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(out)


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, str, dict]:
    """``(root, tag, manifest)`` of a checkpoint: ``path`` is a tag folder, or a
    checkpoints folder (its ``latest``, else its newest complete checkpoint), or a
    run folder holding ``checkpoints/``. Raises :class:`CheckpointError`."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        root, tag = p.parent, p.name
    else:
        if (p / "checkpoints").is_dir() and not (p / "latest").exists():
            p = p / "checkpoints"
        if not p.is_dir():
            raise NoCheckpoint(f"{path}: no such checkpoint folder")
        tag = None
        latest = p / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (p / tag / MANIFEST).is_file():
                tag = None  # 'latest' names an incomplete folder: fall back to the newest complete one
        if tag is None:
            found = list_checkpoints(p)
            if not found:
                raise NoCheckpoint(f"{path}: no complete checkpoint (a folder step_N/ with {MANIFEST})")
            tag = found[-1][1].name
        root = p
    try:
        manifest = json.loads((root / tag / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{root / tag / MANIFEST}: unreadable manifest ({e})") from None
    if manifest.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{root / tag}: not a rest_ds checkpoint (format {manifest.get('format')!r})")
    return root, tag, manifest


_LOW_SPACE = 1 << 20  # bytes: a write that failed with less than this left free failed for want of space


@contextlib.contextmanager
def _write_failures(folder: Path, step: int):
    """A failed checkpoint write becomes a :class:`CheckpointError` naming ``folder``; a full disk
    is said so (torch's own message was 'unexpected pos 17728 vs 17632'), and the incomplete
    checkpoint is removed to give its space back. The complete checkpoints are not touched."""
    try:
        yield
    except Exception as e:
        try:
            free = shutil.disk_usage(folder.parent).free
        except OSError:
            free = None
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < _LOW_SPACE)
        shutil.rmtree(folder, ignore_errors=True)
        if full:
            raise CheckpointError(f"{folder}: no space left on the device while saving the checkpoint of step {step}; "
                                  f"the incomplete checkpoint was removed and the earlier ones kept: free some space "
                                  f"(or set train.keep_checkpoints lower) and resume") from e
        raise CheckpointError(f"{folder}: saving the checkpoint of step {step} failed: {one_line(e)}") from e


def save_checkpoint(engine, root: str | os.PathLike, step: int, manifest: dict, rank_state: dict, *,
                    rank: int, barrier, keep: int = 2) -> Path:
    """Atomically save a DeepSpeed checkpoint of ``step`` (every rank calls it).

    ``manifest`` (rank 0's is written) and ``rank_state`` (per rank) are stored
    next to DeepSpeed's files. Keeps the ``keep`` newest checkpoints."""
    root = Path(root)
    partial = root / ".partial"
    tag = tag_of(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if (partial / tag).exists():
            shutil.rmtree(partial / tag)
        partial.mkdir(exist_ok=True)
    barrier()
    with _write_failures(partial / tag, step):
        engine.save_checkpoint(str(partial), tag=tag, client_state={"rest_ds_step": step}, save_latest=False)
        atomic_torch_save(rank_state, partial / tag / f"rest_ds_rank{rank}.pt")
    barrier()
    if rank == 0:
        with _write_failures(partial / tag, step):
            atomic_write_json(partial / tag / MANIFEST, {"format": CKPT_FORMAT, "step": step, "tag": tag, **manifest,
                                                         "files": file_record(partial / tag)})
        final = root / tag
        if final.exists():  # an older run's checkpoint of the same step: replace it
            shutil.rmtree(final)
        os.rename(partial / tag, final)
        _fsync_dir(root)
        atomic_write_bytes(root / "latest", tag.encode())
        for f in partial.iterdir():  # DeepSpeed's zero_to_fp32.py & co.: usable next to 'latest'
            if f.is_file():
                os.replace(f, root / f.name)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / tag


def load_checkpoint(engine, root: Path, tag: str, *, rank: int) -> dict | None:
    """Load DeepSpeed state of ``root/tag`` into ``engine``; returns this rank's
    ``rank_state`` (None when the checkpoint was written by fewer ranks)."""
    try:
        with safe_loading():
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    except (RuntimeError, KeyError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        # e.g. a checkpoint of another version of the model code: shapes or ZeRO partition layout differ
        raise CheckpointError(f"{root / tag}: DeepSpeed cannot load it into this model and optimizer "
                              f"({type(e).__name__}: {one_line(e)[:300]})") from None
    if path is None:
        raise CheckpointError(f"{root / tag}: DeepSpeed could not load the checkpoint")
    f = root / tag / f"rest_ds_rank{rank}.pt"
    return safe_torch_load(f) if f.is_file() else None


# --- resuming with a changed config ---------------------------------------------------------------
#: Manifest entries a resumed run must share with its checkpoint: the weights and the
#: optimizer state only fit this model, these classes and these bands.
FIXED_ON_RESUME = ("model", "num_classes", "classes", "in_chans", "band_names")
#: Config keys (and key prefixes) that cannot change on resume, for the same reason.
FIXED_CONFIG_KEYS = ("model.", "optimizer.name", "deepspeed.precision", "deepspeed.zero_stage", "data.mode")
#: Model keys that only say where the first weights came from: a resumed run takes its
#: weights from the checkpoint, so these may differ (e.g. a moved pretrained file).
INIT_MODEL_KEYS = ("model.encoder.checkpoint", "model.init_from")


def _fixed(key: str) -> bool:
    return key.startswith(FIXED_CONFIG_KEYS) and not key.startswith(INIT_MODEL_KEYS)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _short(v: Any) -> str:
    t = json.dumps(v, default=str)
    return t if len(t) <= 60 else t[:57] + "..."


def _refuse(where, fixed: list[tuple[str, Any, Any]]) -> None:
    # the manifest's top-level num_classes / in_chans repeat the model section's: name each change once
    fixed = [(k, x, y) for k, x, y in fixed
             if not any(k2.endswith("." + k) and (x2, y2) == (x, y) for k2, x2, y2 in fixed)]
    if fixed:
        what = ", ".join(f"{k} ({_short(x)} -> {_short(y)})" for k, x, y in fixed[:8])
        more = f" and {len(fixed) - 8} more" if len(fixed) > 8 else ""
        raise CheckpointError(f"{where}: cannot resume: the new config changes {what}{more}, which the checkpoint "
                              f"fixes; change them back, or start a new run (train.resume=none or another "
                              f"output_dir)")


def _typed_model(config: dict) -> dict:
    """``config`` with its model section as the typed ModelConfig writes it: checkpoints
    written while that section was an untyped mapping kept YAML's own types (bands
    ``[400, 417]`` where the typed section has ``['400', '417']``)."""
    from ..config_schema import ConfigError, parse_dataclass
    from ..models.config import ModelConfig

    if not isinstance(config.get("model"), dict):
        return config
    try:
        return {**config, "model": parse_dataclass(ModelConfig, config["model"], None, "model").to_dict()}
    except ConfigError:  # compared as written
        return config


def check_resume_config(manifest: dict, config: dict, world_size: int | None, where: str | os.PathLike) -> None:
    """Before any heavy work: refuse a new run's ``config`` (``TrainConfig.to_dict()``)
    whose keys in :data:`FIXED_CONFIG_KEYS` (the model section included) differ from
    the checkpoint's, or whose ``world_size`` differs (None: not known yet)."""
    a, b = _flatten(_typed_model(manifest.get("config") or {})), _flatten(config)
    # precision is compared after the trainer has settled it (bf16/fp16 run as fp32 on a CPU-only machine)
    _refuse(where, [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                    if _fixed(k) and k != "deepspeed.precision" and a.get(k) != b.get(k)])
    if world_size is not None and manifest.get("world_size") not in (None, world_size):
        raise CheckpointError(f"{where}: written by {manifest.get('world_size')} ranks; this job has {world_size}. "
                              f"Resume with the same, or export it ('rest-ds export') and start a new run from the "
                              f"exported weights (model.init_from)")


def resume_changes(old: dict, new: dict, where: str | os.PathLike) -> list[tuple[str, Any, Any]]:
    """Compare a checkpoint's manifest ``old`` with the manifest the new run would
    write, ``new``. Raises :class:`CheckpointError` naming every differing key that
    cannot change (:data:`FIXED_ON_RESUME`, :data:`FIXED_CONFIG_KEYS`); returns the
    other changed config keys as ``(key, old, new)`` (``train.resume``, ``output_dir`` ignored)."""
    fixed = []
    for k in FIXED_ON_RESUME:
        a, b = _flatten(old.get(k), f"{k}."), _flatten(new.get(k), f"{k}.")
        fixed += [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
                  if a.get(key) != b.get(key) and not key.startswith(INIT_MODEL_KEYS)]
    a, b = _flatten(old.get("config") or {}), _flatten(new.get("config") or {})
    changed = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key in ("train.resume", "output_dir"):   # a moved run folder is fine
            continue
        if _fixed(key):
            if not key.startswith("model."):   # model differences are reported from the full model config
                fixed.append((key, a.get(key), b.get(key)))
        else:
            changed.append((key, a.get(key), b.get(key)))
    _refuse(where, fixed)
    return changed


def describe_changes(changes: list[tuple[str, Any, Any]], step: int) -> str:
    """The one-line notice of a resume with changed settings."""
    what = ", ".join(f"{k} {_short(x)} -> {_short(y)}" for k, x, y in changes)
    return f"notice: resuming at step {step} with changed settings: {what} (applied from step {step + 1} on)"


# --- export ----------------------------------------------------------------------------------------
def consolidated_state_dict(root: Path, tag: str, manifest: dict) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, in one process."""
    stage = int(manifest.get("zero_stage", 0))
    if stage >= 1:
        with safe_loading():
            sd = fp32_state_dict(root, tag)
    else:
        f = root / tag / "mp_rank_00_model_states.pt"
        if not f.is_file():
            raise CheckpointError(f"{root / tag}: no {f.name}")
        sd = safe_torch_load(f)["module"]
    return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in sd.items()}


def export_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """The (weights, JSON) paths an export to ``output`` writes: ``output`` with a
    ``.safetensors`` suffix (added when missing) and the ``.json`` beside it."""
    out = Path(output)
    if out.suffix != ".safetensors":
        out = out.with_suffix(out.suffix + ".safetensors") if out.suffix else out.with_suffix(".safetensors")
    return out, out.with_suffix(".json")


def export_model(state_dict: dict[str, torch.Tensor], meta: dict, output: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``output`` (``.safetensors``) and the JSON beside it (same stem);
    both atomically, the JSON last with the weights' sha256. Returns both paths."""
    from safetensors.torch import save_file

    out, js = export_paths(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": EXPORT_FORMAT})
        chmod_like_open(tmp)   # after save_file, which makes the file anew
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write_json(js, {"format": EXPORT_FORMAT, "weights": out.name, "sha256": sha256_file(out), **meta})
    return out, js


def read_export(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, state_dict)`` of an exported model: a ``.safetensors`` file, its
    ``.json``, or a folder holding exactly one such pair."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected one .safetensors file in the folder, found {len(found)}")
        p = found[0]
    if p.suffix == ".json":
        js = p
    else:
        js = p.with_suffix(".json")
    if not js.is_file():
        raise CheckpointError(f"{js}: missing (an exported model is NAME.safetensors + NAME.json; "
                              f"make one with 'rest-ds export')")
    try:
        meta = json.loads(js.read_text())
    except ValueError as e:
        raise CheckpointError(f"{js}: not valid JSON ({e})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{js}: not a rest_ds exported model (format {meta.get('format')!r})")
    weights = js.parent / meta.get("weights", js.with_suffix(".safetensors").name)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (named by {js})")
    if meta.get("sha256") and sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match {js}: the file was changed, truncated or damaged "
                              f"after the export, or the two files come from different exports; export again")
    try:
        return meta, load_file(str(weights))
    except Exception as e:  # safetensors' SafetensorError names no file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({type(e).__name__}: "
                              f"{one_line(e)[:200]})") from None


__all__ = ["CheckpointError", "NoCheckpoint", "MANIFEST", "tag_of", "list_checkpoints", "find_checkpoint", "save_checkpoint",
           "load_checkpoint", "consolidated_state_dict", "export_model", "read_export", "atomic_write_json",
           "atomic_write_bytes", "sha256_file", "safe_torch_load", "safe_loading", "DEEPSPEED_SAFE_GLOBALS",
           "verify_checkpoint", "select_checkpoint", "file_record", "chmod_like_open", "resume_changes",
           "describe_changes", "FIXED_ON_RESUME", "FIXED_CONFIG_KEYS", "check_resume_config", "scan_checkpoint"]
