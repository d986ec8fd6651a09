"""Band adaptation: load a first-layer weight trained on k bands into a layer for c bands.

Every rule is a ``c x k`` mixing matrix ``M`` applied along the weight's
input-channel dim: ``W'[:, i] = sum_j M[i, j] W[:, j]`` (``W``: a Conv2d
``(O, k, kh, kw)`` or Conv3d ``(O, k, t, kh, kw)`` patch-embedding / stem
weight). The rules:

* ``"name"``: bands are matched by name (through :data:`BANDS`, so RGB ``red``
  matches Sentinel-2 ``B04`` and HLS ``RED``; HLS ``NIR_NARROW`` matches S2
  ``B8A``). A matched band's filter is copied exactly; an unmatched new band
  gets the mean of the pretrained filters scaled by ``k / c``.
* ``"mean"``: every new band gets ``mean_j W[:, j] * k / c``. The sum over input
  channels is preserved (``sum_i W'[:, i] = sum_j W[:, j]``), so an input whose
  bands are all equal produces the same activation as before (timm's
  ``adapt_input_conv`` rule for one channel, generalised).
* ``"tile"``: timm's ``adapt_input_conv`` rule for more channels: the k filters
  repeated cyclically, ``W'[:, i] = W[:, i mod k] * k / c``.
* ``"spectral"`` (hyperspectral targets): with centre wavelengths on both sides,
  each new band's filter is the linear interpolation, along wavelength, of the
  two pretrained filters whose wavelengths bracket it (the nearest one outside
  the pretrained range), scaled by ``k / c`` so that c narrow bands sampling a
  spectrum respond like the k broad ones did.
* ``"auto"``: ``"spectral"`` when a band on either side is given only as a
  wavelength (a number), ``"name"`` when both sides are named, otherwise
  ``"mean"`` for one new channel and ``"tile"`` for several (timm's behaviour).

A band is a name (``"B04"``, ``"red"``, ``"NIR_NARROW"``; case-insensitive,
resolved through :data:`BANDS`; unknown names match only themselves and have no
wavelength) or a centre wavelength in nanometres (``float``).
"""
from __future__ import annotations

import math

from typing import Sequence, Union

import torch

Band = Union[str, float, int]

# canonical spectral role -> (centre wavelength in nm (Sentinel-2A), names that denote it).
# B01..B12 / B8A are Sentinel-2 band names; HLS and RGB names map onto the same roles.
BANDS: dict[str, tuple[float, tuple[str, ...]]] = {
    "coastal": (442.7, ("b01", "b1", "coastal", "coastal_aerosol", "aerosol")),
    "blue": (492.4, ("b02", "b2", "blue", "b")),
    "green": (559.8, ("b03", "b3", "green", "g")),
    "red": (664.6, ("b04", "b4", "red", "r")),
    "red_edge_1": (704.1, ("b05", "b5", "red_edge_1", "rededge1", "re1")),
    "red_edge_2": (740.5, ("b06", "b6", "red_edge_2", "rededge2", "re2")),
    "red_edge_3": (782.8, ("b07", "b7", "red_edge_3", "rededge3", "re3")),
    "nir": (832.8, ("b08", "b8", "nir", "nir_broad")),
    "nir_narrow": (864.7, ("b8a", "nir_narrow", "nir08")),
    "water_vapour": (945.1, ("b09", "b9", "water_vapour", "water_vapor")),
    "cirrus": (1373.5, ("b10", "cirrus")),
    "swir_1": (1613.7, ("b11", "swir_1", "swir1", "swir16")),
    "swir_2": (2202.4, ("b12", "swir_2", "swir2", "swir22")),
}
_ALIAS = {alias: role for role, (_, aliases) in BANDS.items() for alias in aliases}

RGB = ("red", "green", "blue")
HLS = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")  # Prithvi-EO's pretraining bands
SENTINEL2 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
RULES = ("auto", "name", "mean", "tile", "spectral")


def canonical(band: Band) -> str | None:
    """The spectral role of a named band (``"B04"`` -> ``"red"``), the lower-cased
    name itself when unknown, None for a wavelength."""
    if isinstance(band, str):
        key = band.strip().lower()
        return _ALIAS.get(key, key)
    return None


def wavelength(band: Band) -> float | None:
    """Centre wavelength in nm of a band (None for an unknown name)."""
    if isinstance(band, bool):
        raise TypeError(f"band {band!r} is neither a name nor a wavelength")
    if isinstance(band, (int, float)):
        return float(band)
    role = canonical(band)
    if role in BANDS:
        return BANDS[role][0]
    # a wavelength as text: config values arrive as strings ("417"), scene band names as "417nm"
    text = role[:-2].strip() if role.endswith("nm") else role
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _resolve_rule(rule: str, src: Sequence[Band] | None, dst: Sequence[Band] | None, c: int) -> str:
    if rule not in RULES:
        raise ValueError(f"band rule must be one of {RULES}, not {rule!r}")
    if rule != "auto":
        return rule
    if src is not None and dst is not None:
        if any(not isinstance(b, str) for b in list(src) + list(dst)):
            return "spectral"
        return "name"
    return "mean" if c == 1 else "tile"


def band_mapping(k: int, c: int, src_bands: Sequence[Band] | None = None, dst_bands: Sequence[Band] | None = None,
                 rule: str = "auto") -> torch.Tensor:
    """The ``c x k`` float64 matrix ``M`` of a rule (module docstring):
    new band i = ``sum_j M[i, j]`` x pretrained band j."""
    if src_bands is not None and len(src_bands) != k:
        raise ValueError(f"{len(src_bands)} pretrained band names for a weight with {k} input channels")
    if dst_bands is not None and len(dst_bands) != c:
        raise ValueError(f"{len(dst_bands)} band names for {c} input channels")
    rule = _resolve_rule(rule, src_bands, dst_bands, c)
    M = torch.zeros(c, k, dtype=torch.float64)
    if rule == "mean":
        M[:] = 1.0 / c  # mean (1/k) times k/c
    elif rule == "tile":
        for i in range(c):
            M[i, i % k] = k / c
    elif rule == "name":
        if src_bands is None or dst_bands is None:
            raise ValueError("band rule 'name' needs the band names of both the checkpoint and the model")
        src = [canonical(b) for b in src_bands]
        if None in src or any(canonical(b) is None for b in dst_bands):
            raise ValueError("band rule 'name' needs named bands on both sides (use 'spectral' for wavelengths)")
        if len(set(src)) != len(src):
            raise ValueError(f"pretrained bands {list(src_bands)} name one band twice")
        for i, b in enumerate(dst_bands):
            role = canonical(b)
            if role in src:
                M[i, src.index(role)] = 1.0
            else:
                M[i] = 1.0 / c
    else:  # spectral
        if src_bands is None or dst_bands is None:
            raise ValueError("band rule 'spectral' needs the bands (names or wavelengths) of both sides")
        ls, ld = [wavelength(b) for b in src_bands], [wavelength(b) for b in dst_bands]
        unknown = [b for b, l in zip(list(src_bands) + list(dst_bands), ls + ld) if l is None]
        if unknown:
            raise ValueError(f"band rule 'spectral' needs a centre wavelength for every band; unknown: {unknown}")
        order = sorted(range(k), key=lambda j: ls[j])
        lam = [ls[j] for j in order]
        if len(set(lam)) != len(lam):
            raise ValueError(f"pretrained bands {list(src_bands)} share a centre wavelength")
        for i, l in enumerate(ld):
            if l <= lam[0]:
                M[i, order[0]] = 1.0
            elif l >= lam[-1]:
                M[i, order[-1]] = 1.0
            else:
                j = max(n for n in range(k - 1) if lam[n] <= l)
                a = (l - lam[j]) / (lam[j + 1] - lam[j])
                M[i, order[j]] += 1.0 - a
                M[i, order[j + 1]] += a
        M *= k / c
    return M


def adapt_input_weight(weight: torch.Tensor, src_bands: Sequence[Band] | None = None,
                       dst_bands: Sequence[Band] | None = None, in_chans: int | None = None,
                       rule: str = "auto") -> torch.Tensor:
    """A first-layer weight for new bands: ``weight`` has its k input channels on
    dim 1; returns the same shape with c = ``len(dst_bands)`` (or ``in_chans``)
    input channels, in ``weight``'s dtype. Returned unchanged when nothing is to
    be adapted: the same bands in the same order, or c == k with a side unnamed."""
    k = weight.shape[1]
    c = len(dst_bands) if dst_bands is not None else in_chans
    if c is None:
        raise ValueError("give dst_bands or in_chans")
    if in_chans is not None and c != in_chans:
        raise ValueError(f"{c} band names for in_chans={in_chans}")
    if src_bands is not None and len(src_bands) != k:
        raise ValueError(f"{len(src_bands)} pretrained band names for a weight with {k} input channels")
    if c == k and (src_bands is None or dst_bands is None or all(
            (canonical(a) or a) == (canonical(b) or b) for a, b in zip(src_bands, dst_bands))):
        return weight
    M = band_mapping(k, c, src_bands, dst_bands, rule)
    out = torch.einsum("ij,oj...->oi...", M, weight.double())
    return out.to(weight.dtype)


def adapt_state_dict(state_dict: dict, key: str, src_bands: Sequence[Band] | None = None,
                     dst_bands: Sequence[Band] | None = None, in_chans: int | None = None,
                     rule: str = "auto", missing_ok: bool = False) -> dict:
    """``state_dict`` with ``state_dict[key]`` (the first conv / patch-embedding
    weight) adapted by :func:`adapt_input_weight` (a copy when it changed; the
    same dict when nothing was adapted or, with ``missing_ok``, the key is absent)."""
    if key not in state_dict:
        if missing_ok:
            return state_dict
        raise KeyError(f"checkpoint has no first-layer weight '{key}'")
    w = adapt_input_weight(state_dict[key], src_bands, dst_bands, in_chans, rule)
    if w is state_dict[key]:
        return state_dict
    out = dict(state_dict)
    out[key] = w
    return out


__all__ = ["BANDS", "RGB", "HLS", "SENTINEL2", "RULES", "Band", "canonical", "wavelength", "band_mapping",
           "adapt_input_weight", "adapt_state_dict"]
