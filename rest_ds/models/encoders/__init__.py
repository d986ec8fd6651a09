"""Feature encoders, registered by name (``rest_ds.models.registry``).

Importing this package registers:

* ``timm_vit``: any timm ``vit_*`` / ``samvit_*`` VisionTransformer at the scene size (timm_vit.py);
* ``hf_sam``: transformers' ``SamVisionEncoder`` at any scene size (hf_sam.py);
* ``prithvi_vit`` and the TerraTorch presets ``prithvi_eo_tiny``, ``prithvi_eo_v1_100``,
  ``prithvi_eo_v2_100``, ``prithvi_eo_v2_300``, ``prithvi_eo_v2_300_tl``, ``prithvi_eo_v2_600``,
  ``prithvi_eo_v2_600_tl``: the Prithvi-EO-2.0 encoder in plain PyTorch (prithvi.py);
* ``hf_segformer``: transformers' SegFormer (MiT-b0..b5) encoder (hf_segformer.py);
* ``timm_pvt_v2``: timm PVT-v2 (``pvt_v2_b0``..``b5``, ``pvt_v2_b2_li``) (timm_pvt.py);
* ``timm_cnn``: timm CNNs with ``features_only=True`` (timm_cnn.py);
* ``timm_swin``: timm ``swin_*`` / ``swinv2_*``, and ``hf_swin``: transformers' Swin (swin.py).

Every encoder follows the registry's contract: ``forward(x) -> list of NCHW
maps`` and ``out_channels``, ``strides``, ``align``. Checkpoints trained on
other bands are adapted by the rules in bands.py.
"""
from . import bands
from .bands import adapt_input_weight, adapt_state_dict, band_mapping
from .hf_sam import HFSamEncoder, hf_sam
from .hf_segformer import HFSegformerEncoder, hf_segformer
from .prithvi import PrithviViT, prithvi_vit
from .swin import HFSwinEncoder, TimmSwinEncoder, hf_swin, timm_swin
from .timm_cnn import TimmCNNEncoder, timm_cnn
from .timm_pvt import TimmPVTv2Encoder, timm_pvt_v2
from .timm_vit import TimmViTEncoder, timm_vit

__all__ = ["bands", "adapt_input_weight", "adapt_state_dict", "band_mapping", "HFSamEncoder", "hf_sam",
           "HFSegformerEncoder", "hf_segformer", "TimmPVTv2Encoder", "timm_pvt_v2",
           "PrithviViT", "prithvi_vit", "TimmCNNEncoder", "timm_cnn", "TimmViTEncoder", "timm_vit",
           "TimmSwinEncoder", "timm_swin", "HFSwinEncoder", "hf_swin"]
