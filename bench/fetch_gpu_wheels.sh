#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (git-ignored folders), for bench/gpu_check.sh.
# The device image has Python 3.12 with torch, transformers, accelerate, pandas, pyarrow,
# fsspec, timm and scikit-image, but none of these. A device call carries at most 64 MiB,
# so the wheels come in three folders and each mode of gpu_check.sh carries what it needs:
#   .whl/        the GPU stages' libraries (CUDA tests, throughput benchmarks)      ~13 MiB
#   .whl-flows/  Prefect, prefect-dask and Dask (worker scaling, the demo)          ~37 MiB
#   .whl-demo/   matplotlib, and the diffusers/peft/pycocotools the demo imports    ~25 MiB
# `du -sh .whl*` prints what this run fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
download() {  # download FOLDER [--no-deps] REQUIREMENT...: cp312 manylinux wheels
  local folder=$1; shift
  mkdir -p "$folder"
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$folder" "$@"
}
# Already on the device (or never imported: apprise and docker are only Prefect's optional
# notification blocks and Docker commands, oauthlib only apprise's): left out of the trees below.
ON_DEVICE=(numpy pillow scipy pyyaml regex requests urllib3 idna certifi charset-normalizer fsspec jinja2 markupsafe
           python-dateutil pytz tzdata six psutil packaging filelock tqdm huggingface-hub safetensors tokenizers
           apprise docker oauthlib requests-oauthlib)
keep_missing() {  # keep_missing STAGING FOLDER: move STAGING's wheels not ON_DEVICE into FOLDER
  mkdir -p "$2"
  for wheel in "$1"/*.whl; do
    local name
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
    [[ " ${ON_DEVICE[*]} " == *" $name "* ]] || mv -f "$wheel" "$2/"
  done
  rm -rf "$1"
}

PYDANTIC=(pydantic==2.14.4 pydantic-core==2.50.5)
download .whl --no-deps \
  diffusers==0.42.1 segment-anything==1.0 pycocotools==2.0.11 "${PYDANTIC[@]}" \
  annotated-types typing-inspection importlib-metadata addict yapf platformdirs supervision==0.6.0 \
  ftfy wcwidth open_clip_torch==3.3.0 peft==0.21.2
# groundingdino-py is published as an sdist only; it is pure Python, so build its wheel here.
python3 -m pip wheel -q --no-deps groundingdino-py==0.4.0 -w .whl

download .whl-flows.tmp prefect==3.9.1 prefect-dask==0.3.7 dask==2026.8.0 distributed==2026.8.0 "${PYDANTIC[@]}"
keep_missing .whl-flows.tmp .whl-flows

download .whl-demo.tmp matplotlib==3.11.2
keep_missing .whl-demo.tmp .whl-demo
cp .whl/diffusers-*.whl .whl/peft-*.whl .whl/pycocotools-*.whl .whl/importlib_metadata-*.whl .whl-demo/
du -sh .whl .whl-flows .whl-demo
