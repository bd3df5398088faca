#!/usr/bin/env bash
# One-call GPU check for a lent device machine (see docs/BENCHMARKS.md):
# CUDA tests, then full-size random-weight benchmarks of the three GPU stages.
# Results land in $OUT (default ./gpu-out). Budget: under 8 minutes in all (the
# time limits below add up to 460 s).
#
# The device image has torch/transformers/accelerate but not diffusers,
# segment-anything, groundingdino-py, pycocotools or pydantic: they travel as
# wheels in .whl/ (see docs/BENCHMARKS.md for the download command).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
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

run cuda_tests 90 python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_evaluation.py -p no:cacheprovider
# Training step, plain vs grounded vs reference-style, full fine-tune and LoRA rank 64, batch 1 and 4,
# bf16, gradient checkpointing off and on: SD 1.4 at 512 px and SDXL at 1024 px (full-size, random weights).
STEP=(python3 bench/train_step.py --device cuda --full --modes full lora --lora-rank 64 --steps 2)
run train_step_sd14 55 "${STEP[@]}" --arch sd14 --out "$OUT/train_step_sd14.json"
run train_step_sd14_gc 55 "${STEP[@]}" --arch sd14 --gradient-checkpointing --out "$OUT/train_step_sd14_gc.json"
run train_step_sdxl 75 "${STEP[@]}" --arch sdxl --out "$OUT/train_step_sdxl.json"
run train_step_sdxl_gc 75 "${STEP[@]}" --arch sdxl --gradient-checkpointing --out "$OUT/train_step_sdxl_gc.json"
run sample_throughput 55 python3 bench/sample_throughput.py --device cuda --full --out "$OUT/sample_throughput.json"
run masks_throughput 55 python3 bench/masks_throughput.py --device cuda --full --out "$OUT/masks_throughput.json"
# SD 3.5 medium's transformer (MMDiT) at 1024 px, random weights: the joint-attention capture under bf16 on
# the GPU's kernels, then plain vs grounded (lean capture) vs explicit all-maps, full and LoRA rank 64, batch 1.
# These two steps add 120 s of limits.
run attention_mmdit_cuda 30 python3 -m pytest -q -m cuda tests/test_attention_mmdit.py -p no:cacheprovider
run train_step_sd35 90 python3 bench/train_step.py --arch sd35 --device cuda --full --modes full lora --lora-rank 64 \
  --steps 2 --batches 1 --out "$OUT/train_step_sd35.json"
cat "$OUT/summary.txt"
