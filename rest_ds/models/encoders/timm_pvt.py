"""timm PVT-v2 (``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li``) as a registered encoder.

The unmodified timm model with ``features_only=True`` (through
:class:`~.timm_cnn.TimmCNNEncoder`: checkpoints and band adaptation as there):
overlapping patch embeddings, spatial-reduction attention (keys/values on the
grid reduced by a ``sr_i`` x ``sr_i`` strided conv; the ``_li`` variants pool
them to 7 x 7 instead) and Mix-FFN depthwise convs; NCHW maps at strides 4, 8,
16, 32. ``align`` adds the reduction convs' alignment ``s_i * sr_i``
(:func:`~.hf_segformer.sr_align`; 32 for every released variant); the 7 x 7
adaptive pool of the ``_li`` variants needs none.
"""
from __future__ import annotations

from torch import nn

from ..registry import register_encoder
from .hf_segformer import sr_align
from .timm_cnn import TimmCNNEncoder


class TimmPVTv2Encoder(TimmCNNEncoder):
    """timm ``pvt_v2_*`` with ``features_only=True``; arguments as
    :class:`~.timm_cnn.TimmCNNEncoder` (``timm_kwargs`` override the
    architecture, e.g. ``embed_dims``, ``depths``, ``num_heads``, ``sr_ratios``)."""

    def __init__(self, model_name: str = "pvt_v2_b0", **kwargs):
        if not model_name.startswith("pvt_v2"):
            raise ValueError(f"TimmPVTv2Encoder builds timm pvt_v2_* models, not {model_name!r}")
        super().__init__(model_name, **kwargs)
        sr = []
        for i, _ in enumerate(self.strides):
            stage = getattr(self.model, f"stages_{i}", None)
            attn = stage.blocks[0].attn if stage is not None else None
            conv = getattr(attn, "sr", None)
            strided = isinstance(conv, nn.Conv2d) and getattr(attn, "pool", None) is None
            sr.append(conv.stride[0] if strided else 1)
        self.sr_ratios = sr
        self.align = sr_align(self.strides, sr)


@register_encoder("timm_pvt_v2")
def timm_pvt_v2(model_name: str = "pvt_v2_b0", **kwargs) -> TimmPVTv2Encoder:
    """timm PVT-v2 by name; see :class:`TimmPVTv2Encoder`."""
    return TimmPVTv2Encoder(model_name, **kwargs)


__all__ = ["TimmPVTv2Encoder", "timm_pvt_v2"]
