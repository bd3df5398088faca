#!/usr/bin/env bash
# One-call GPU check for a lent device machine (see docs/BENCHMARKS.md). Results land in
# $OUT (default ./gpu-out).
#
#   bash bench/gpu_check.sh        # CUDA tests, full-size random-weight benchmarks of the three
#                                  # GPU stages, and the masks and sample stages on 1, 2, ... N
#                                  # GPUs (one Dask worker per GPU). Carry .whl and .whl-flows.
#                                  # The time limits below add up to 460 s (+ ~30 s of installs).
#   bash bench/gpu_check.sh demo   # tokencompose demo --profile demo-gpu (<= 10 min on one
#                                  # H100-class GPU; limit 540 s). Carry .whl-flows and .whl-demo.
#
# The device image has torch/transformers/accelerate but not diffusers, segment-anything,
# groundingdino-py, pycocotools, pydantic, Prefect, Dask or matplotlib: they travel as wheels
# in .whl*/ folders (bench/fetch_gpu_wheels.sh downloads them).
set -uo pipefail
MODE=${1:-check}
case "$MODE" in check | demo) ;; *) echo "usage: bash bench/gpu_check.sh [demo]" >&2; exit 2 ;; esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PREFECT_SERVER_ANALYTICS_ENABLED=false
# Every wheel folder carried here, each wheel once (the folders share a few).
mapfile -t WHEELS < <(ls .whl*/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
if [ ${#WHEELS[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS[@]}" || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

run() {  # run NAME SECONDS CMD...: time-boxed step, log kept, failures recorded not fatal
  local name=$1 seconds=$2; shift 2
  echo "=== $name (limit ${seconds}s)"
  local start=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/summary.txt"

if [ "$MODE" = demo ]; then
  # The world's images stay on the device; the report and its figures come back.
  run demo_gpu 540 python3 -m flows.cli demo --profile demo-gpu --out /tmp/demo-gpu
  mkdir -p "$OUT/demo-gpu"
  cp /tmp/demo-gpu/reports/demo-*/*.{md,json,html,png} "$OUT/demo-gpu/" 2>/dev/null
  cat "$OUT/summary.txt"
  exit 0
fi

run cuda_tests 70 python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_evaluation.py -p no:cacheprovider
# Training step, plain vs grounded vs reference-style, full fine-tune and LoRA rank 64, batch 1 and 4,
# bf16, gradient checkpointing off and on: SD 1.4 at 512 px and SDXL at 1024 px (full-size, random weights).
STEP=(python3 bench/train_step.py --device cuda --full --modes full lora --lora-rank 64 --steps 2)
run train_step_sd14 40 "${STEP[@]}" --arch sd14 --out "$OUT/train_step_sd14.json"
run train_step_sdxl 50 "${STEP[@]}" --arch sdxl --out "$OUT/train_step_sdxl.json"
run train_step_sdxl_gc 50 "${STEP[@]}" --arch sdxl --gradient-checkpointing --out "$OUT/train_step_sdxl_gc.json"
run sample_throughput 40 python3 bench/sample_throughput.py --device cuda --full --out "$OUT/sample_throughput.json"
run masks_throughput 40 python3 bench/masks_throughput.py --device cuda --full --out "$OUT/masks_throughput.json"
# The stages' flows on 1, 2, 4, ... N GPUs, one Dask worker per GPU (tiny profile: the
# orchestration's share, not the models', is what a lent machine can show here).
GPUS=$(nvidia-smi -L | wc -l)
SIZES=$(python3 -c "n = $GPUS; print(*sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n}))")
run masks_scaling 35 python3 bench/masks_throughput.py --gpus $SIZES --out "$OUT/masks_scaling.json"
run sample_scaling 35 python3 bench/sample_throughput.py --gpus $SIZES --out "$OUT/sample_scaling.json"
# SD 3.5 medium's transformer (MMDiT) at 1024 px, random weights: the joint-attention capture under bf16 on
# the GPU's kernels, then plain vs grounded (lean capture) vs explicit all-maps, full and LoRA rank 64, batch 1.
run attention_mmdit_cuda 25 python3 -m pytest -q -m cuda tests/test_attention_mmdit.py -p no:cacheprovider
run train_step_sd35 75 python3 bench/train_step.py --arch sd35 --device cuda --full --modes full lora --lora-rank 64 \
  --steps 2 --batches 1 --out "$OUT/train_step_sd35.json"
cat "$OUT/summary.txt"
