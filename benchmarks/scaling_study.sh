#!/usr/bin/env bash
# The scaling study of docs/scaling.md section 5: `rest-ds bench` on 1 and 2 local CPU ranks (one
# thread each) for the three model families, strong scaling on the real nc-landsat7 scene (and at
# 1024 x 1024 for the ViT) and weak scaling from two tile sizes. Run it on a machine with nothing
# else running: the figures are wall-clock medians (about 12 minutes on 2 cores).
#
#   vit  the main job's Prithvi-EO-2.0-architecture ViT + UPerNet (configs/nc_landsat7_rest.yaml)
#   cnn  timm ResNet-18 + UPerNet with an auxiliary head (configs/nc_landsat7_resnet18.yaml)
#   sam  the SAM image encoder (transformers' SamVisionEncoder: windowed + global attention with
#        decomposed relative positions, conv neck) + simple pyramid + FPN head
#        (configs/nc_landsat7_sam.yaml), narrowed to a CPU budget (192 wide, 4 blocks, 2 global,
#        window 7: tiles on multiples of 112 px) and ZeRO-2 (the config's ZeRO-3 is for GPUs)
#
# Usage: bash benchmarks/scaling_study.sh [OUT (default runs/scaling)] [vit cnn sam]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
[ -x "$BIN/rest-ds" ] || { echo "scaling_study.sh: run 'bash scripts/setup.sh' first" >&2; exit 1; }
OUT="${1:-runs/scaling}"
shift || true
MODELS=("${@:-vit cnn sam}")
read -r -a MODELS <<< "${MODELS[*]}"
export OMP_NUM_THREADS=1

for m in "${MODELS[@]}"; do
  case "$m" in
    vit)
      "$BIN/rest-ds" bench --config configs/nc_landsat7_rest.yaml --scenes real,1024x1024 \
        --weak 256x256,512x512 --layouts 1,2 --steps 5 --warmup 2 --infer 1 --out "$OUT/vit" ;;
    cnn)
      "$BIN/rest-ds" bench --config configs/nc_landsat7_resnet18.yaml --scenes real \
        --weak 256x256,512x512 --layouts 1,2 --steps 5 --warmup 2 --infer 1 --out "$OUT/cnn" ;;
    sam)
      "$BIN/rest-ds" bench --config configs/nc_landsat7_sam.yaml --scenes real \
        --weak 224x224,448x448 --layouts 1,2 --steps 3 --warmup 1 --infer 1 --out "$OUT/sam" \
        deepspeed.zero_stage=2 \
        'model.encoder.kwargs={variant: null, hidden_size: 192, num_hidden_layers: 4, num_attention_heads: 3, global_attn_indexes: [1, 3], window_size: 7, output_channels: 96, img_size: [224, 224]}' \
        model.neck.kwargs.out_channels=64 model.decoder.channels=64 model.decoder.kwargs.head_channels=32 ;;
    *) echo "scaling_study.sh: unknown model '$m' (vit, cnn, sam)" >&2; exit 2 ;;
  esac
done
echo "scaling_study.sh: results in $OUT/{${MODELS[*]// /,}}/ (bench.json, bench.csv, *.png)"
