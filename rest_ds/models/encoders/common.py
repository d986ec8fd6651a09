"""Helpers shared by the encoders: checkpoint files, position-table resizing, strict loading."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

StateDict = dict[str, torch.Tensor]


def read_state_dict(checkpoint: str | Path | StateDict) -> StateDict:
    """A state dict from a dict, a ``.safetensors`` file or a ``torch.save`` file
    (unwrapping a top-level ``'model'`` / ``'state_dict'`` entry)."""
    if isinstance(checkpoint, dict):
        sd = checkpoint
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint '{path}' does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
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
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=False)


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
