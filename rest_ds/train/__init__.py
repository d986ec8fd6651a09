"""Training and inference: DeepSpeed engine with SPIM, evaluation, checkpoints,
export and whole-scene segmentation to GeoTIFF (docs/design.md sections 4-5).

Heavy imports (deepspeed, rasterio) happen in the submodules, on use:

* :mod:`.config`: ``TrainConfig`` and ``load_config`` (YAML + ``key=value`` overrides, validated);
* :mod:`.engine`: ``Trainer`` (SPIM inside DeepSpeed ZeRO 0-3), ``init_job``;
* :mod:`.deepspeed_compat`: every DeepSpeed-specific adaptation (the only module importing DeepSpeed),
  each checked against the DeepSpeed version it was written for;
* :mod:`.metrics`: the pixel loss, confusion matrices, mIoU / OA / F1 / kappa;
* :mod:`.checkpoint`: atomic DeepSpeed checkpoints, export to safetensors + JSON;
* :mod:`.inference` / :mod:`.segment`: whole-scene and sliding-window inference, GeoTIFF output;
* :mod:`.cli`: ``rest-ds train``, ``rest-ds segment``, ``rest-ds export``.
"""
