"""Helpers shared by the encoders: checkpoint files, position-table resizing, strict loading."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...cli_args import one_line

StateDict = dict[str, torch.Tensor]


# the weight files of a transformers / timm ``save_pretrained`` folder, in the order they are looked for
PRETRAINED_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The weights file of ``checkpoint``: the file itself, or in a ``save_pretrained``
    folder (transformers, timm) the first of :data:`PRETRAINED_FILES` it holds."""
    path = Path(checkpoint)
    if path.is_dir():
        for name in PRETRAINED_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"checkpoint folder '{path}' holds none of {', '.join(PRETRAINED_FILES)}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return path


def _read_file(path: Path) -> StateDict:
    if path.name.endswith(".index.json"):  # a sharded save_pretrained: every shard of the weight map
        import json

        shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(_read_file(path.parent / shard))
        return sd
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # weights_only: a checkpoint file cannot run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint '{path}' is not a weights-only torch file ({type(e).__name__}: "
                         f"{one_line(e)[:160]})") from None


def read_state_dict(checkpoint: str | Path | StateDict) -> StateDict:
    """A state dict from a dict, a ``.safetensors`` file, a ``torch.save`` file
    (loaded with ``weights_only=True``) or a ``save_pretrained`` folder
    (:func:`checkpoint_file`), unwrapping a top-level ``'model'`` /
    ``'state_dict'`` entry."""
    if isinstance(checkpoint, dict):
        sd = checkpoint
    else:
        sd = _read_file(checkpoint_file(checkpoint))
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint '{checkpoint}' holds a {type(sd).__name__}, not a state dict")
    for wrapper in ("model", "state_dict"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    return dict(sd)


def to_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"a scene size is an int or (H, W), not {size}")
    return size


def check_divisible(img_size: tuple[int, int], patch: int, what: str) -> None:
    if img_size[0] % patch or img_size[1] % patch:
        raise ValueError(f"{what}: scene size {img_size} must be a multiple of the patch size {patch} "
                         "(pad the scene, or crop it)")


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Decomposed relative-position table ``(L, C)`` -> ``(length, C)`` by linear
    interpolation: the same resampling SAM's ``get_rel_pos`` applies at forward
    time when the table does not match the token grid."""
    if table.shape[0] == length:
        return table
    t = F.interpolate(table.float().reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return t.reshape(-1, length).permute(1, 0).to(table.dtype).contiguous()


def resize_pos_nhwc(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Absolute position table ``(1, h, w, C)`` -> ``(1, H, W, C)``, bicubic
    (``align_corners=False``, no antialiasing: detectron2 ViTDet's ``get_abs_pos``)."""
    if tuple(pos.shape[1:3]) == tuple(size):
        return pos
    t = F.interpolate(pos.float().permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).to(pos.dtype).contiguous()


def resample_pos_nhwc(pos: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Forward-time resampling of an absolute position table ``(1, h, w, C)`` to
    ``(1, H, W, C)``, bicubic (``align_corners=False``; ``antialias`` as timm's
    ``resample_abs_pos_embed``), in the table's own dtype (fp32/fp64; half types
    go through fp32) so that float64 runs stay float64. Called on the replicated
    parameter for the input's *global* token grid (under SPIM each rank then adds
    its tile of the result); the identity when the sizes already match."""
    if tuple(pos.shape[1:3]) == tuple(size):
        return pos
    t = pos if pos.dtype in (torch.float32, torch.float64) else pos.float()
    t = F.interpolate(t.permute(0, 3, 1, 2), size=tuple(size), mode="bicubic", align_corners=False,
                      antialias=antialias)
    return t.permute(0, 2, 3, 1).to(pos.dtype)


def load_strict(model: nn.Module, state_dict: StateDict, what: str, ignore_missing: Iterable[str] = ()) -> None:
    """``model.load_state_dict(state_dict)`` with one clear error listing every
    missing, unexpected or mis-shaped key (``ignore_missing``: key prefixes the
    model may keep at their initial values)."""
    own = model.state_dict()
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state_dict and not any(k.startswith(p) for p in ignore_missing)]
    unexpected = [k for k in state_dict if k not in own]
    if bad_shape or missing or unexpected:
        lines = [f"{what}: the checkpoint does not match the model"]
        for name, items in (("shape mismatch", bad_shape), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" (+{len(items) - 12} more)" if len(items) > 12 else ""
                lines.append(f"  {name}: {', '.join(items[:12])}{more}")
        lines.append(f"  fix: {_load_fix(list(own), list(state_dict), missing, unexpected, bad_shape)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=False)


def _key_prefix(keys: list[str], targets: set[str]) -> str | None:
    """The leading dotted prefix (e.g. ``'encoder.'``, ``'model.backbone.'``)
    that, cut from every key of ``keys`` that has it, turns at least half of
    ``targets`` into matches; None if there is none."""
    heads: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(len(parts), 4)):
            heads[".".join(parts[:i]) + "."] = heads.get(".".join(parts[:i]) + ".", 0) + 1
    for head, _ in sorted(heads.items(), key=lambda kv: -kv[1]):
        hits = sum(1 for k in keys if k.startswith(head) and k[len(head):] in targets)
        if targets and hits * 2 >= len(targets):
            return head
    return None


def _load_fix(own: list[str], file: list[str], missing: list[str], unexpected: list[str],
              bad_shape: list[str]) -> str:
    """What to change so that a checkpoint loads: its keys carry a prefix the
    model's lack (or the reverse), or it was saved from another size or
    architecture (shapes, or keys in neither)."""
    if missing and unexpected:
        pre = _key_prefix(unexpected, set(missing))
        if pre is not None:
            return (f"the file's keys start with '{pre}' (a wrapper's name); save it again without it, e.g. "
                    f"{{k.removeprefix('{pre}'): v for k, v in sd.items() if k.startswith('{pre}')}}")
        pre = _key_prefix(missing, set(unexpected))
        if pre is not None:
            return (f"the model's keys start with '{pre}', the file's do not: the file holds only part of "
                    f"this encoder; use a checkpoint of the whole encoder")
    if bad_shape:
        return ("the file was saved from another model size: set the encoder's kwargs (embed_dim, depth, "
                "heads, patch size, ...) to the file's, or use a checkpoint of this size")
    if len(unexpected) >= len(file) or len(missing) >= len(own):
        return "the file holds another architecture: choose the encoder (model.encoder.name / model_name) it was saved from"
    return ("the file was saved with another depth or variant: set the encoder's kwargs (depth, ...) to the "
            "file's, or use a checkpoint of this variant")


def describe_source(checkpoint) -> str:
    """How a load report names a checkpoint: its weights file, or 'a state dict'."""
    if isinstance(checkpoint, dict):
        return "a state dict"
    try:
        return str(checkpoint_file(checkpoint))
    except FileNotFoundError:
        return str(checkpoint)


def adapt_bands(sd: StateDict, key: str, src, dst, in_chans: int, rule: str) -> tuple[StateDict, str]:
    """:func:`bands.adapt_state_dict` plus the note a load report prints: the rule
    used and the band counts, or 'bands unchanged'."""
    from .bands import _resolve_rule, adapt_state_dict

    out = adapt_state_dict(sd, key, src, dst, in_chans, rule, missing_ok=True)
    if out is sd:
        return out, "bands unchanged"
    k = sd[key].shape[1]
    c = len(dst) if dst is not None else in_chans
    return out, f"{key} adapted {k} -> {c} bands by rule '{_resolve_rule(rule, src, dst, c)}'"


def load_report(what: str, source: str, loaded: StateDict, model: nn.Module, dropped: Iterable[str] = (),
                resized: Iterable[str] = (), bands: str = "bands unchanged",
                ignore_missing: Iterable[str] = ()) -> str:
    """One line saying what a load did: file, keys loaded / missing (left at their
    initial values) / unexpected (dropped) / resized, and the band rule."""
    own = model.state_dict()
    missing = [k for k in own if k not in loaded]
    dropped, resized = list(dropped), list(resized)

    def few(items):
        return f" ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})" if items else ""

    return (f"{what}: loaded {source}: {len(loaded)} tensors loaded, {len(missing)} missing{few(missing)}, "
            f"{len(dropped)} unexpected dropped{few(dropped)}, {len(resized)} resized{few(resized)}; {bands}")


def normalize_indices(indices: int | Sequence[int] | None, depth: int, what: str) -> list[int]:
    """Block indices: None -> the last block, int n -> the last n blocks, a list ->
    those blocks (negative counts from the end); sorted, unique, checked."""
    if indices is None:
        out = [depth - 1]
    elif isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"{what}: cannot take the last {indices} of {depth} blocks")
        out = list(range(depth - indices, depth))
    else:
        out = []
        for i in indices:
            j = int(i) + depth if int(i) < 0 else int(i)
            if not 0 <= j < depth:
                raise ValueError(f"{what}: block index {i} out of range for {depth} blocks")
            out.append(j)
        out = sorted(set(out))
    if not out:
        raise ValueError(f"{what}: no feature blocks chosen")
    return out
