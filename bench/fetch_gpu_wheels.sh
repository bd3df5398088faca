#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), for
# bench/gpu_check.sh. The device image has Python 3.12 with torch, transformers,
# accelerate, pandas, pyarrow, fsspec and timm, but none of these.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  diffusers==0.42.1 segment-anything==1.0 pycocotools==2.0.11 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types typing-inspection importlib-metadata addict yapf platformdirs supervision==0.6.0 \
  ftfy wcwidth open_clip_torch==3.3.0 peft==0.21.2
# groundingdino-py is published as an sdist only; it is pure Python, so build its wheel here.
python3 -m pip wheel -q --no-deps groundingdino-py==0.4.0 -w .whl
ls .whl
