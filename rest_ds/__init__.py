"""rest_ds: whole-scene remote-sensing segmentation with SPIM (exact spatial parallelism)."""

__version__ = "0.1.0"
