"""What changes the demo's numbers? The same short training step by step under one change at a time.

    python bench/demo_determinism.py [--steps 30] [--out determinism.json]

Trains the demo's base model (the demo profile's model, world and batch) for a few
steps in a fresh process per variant and compares the bytes of the published U-Net:

* ``again``: the reference settings a second time (run-to-run noise on one machine);
* ``threads=1``: one torch thread instead of the pinned two (another core count);
* ``isa=avx2`` / ``isa=default``: ATen's vectorised kernels capped at AVX2 / no SIMD
  (``ATEN_CPU_CAPABILITY``: a machine without AVX-512, or an older one);
* ``loaded``: the reference settings while two busy processes compete for the cores.

Each row says whether the weights are bit-identical to the reference and, when not,
the largest absolute difference. Prints and writes JSON; imports no Prefect.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {},
    "again": {},
    "threads=1": {"threads": 1},
    "isa=avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2"}},
    "isa=default": {"env": {"ATEN_CPU_CAPABILITY": "default"}},
    "loaded": {"load": 2},
}


def train_once(out: str, steps: int, threads: int) -> str:
    """Build the demo world (once per folder) and train the base model ``steps`` steps; its U-Net folder."""
    from tokencompose_core import demo
    from tokencompose_core.config import load_config
    from tokencompose_core.stages import train

    overrides = demo.demo_overrides(out, [f"demo.base.steps={steps}", f"demo.base_threads={threads}",
                                          "demo.world.train_images=2000"])
    config = load_config(demo.PROFILES[False], overrides)
    world = demo.plan_world(config)
    demo.build_world(config, world.nouns, world.masks, world.prompts_uri)
    base = load_config(demo.PROFILES[False], [*overrides, *demo.run_overrides(config, "base")])
    plan = train.plan(base, world.masks[world.pretrain_split()])
    return train.train(base.train, base.models, plan.cache_uri, plan.out_uri).unet_uri


def _busy() -> None:
    while True:
        pass


def run_variant(name: str, spec: dict[str, Any], steps: int, work: str) -> str:
    """Train in a fresh interpreter (environment variables act at import), optionally under load."""
    out = os.path.join(work, name)
    env = {**os.environ, **spec.get("env", {})}
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.demo_determinism import train_once; "
            f"print(train_once({out!r}, {steps}, {spec.get('threads', 2)}))")
    hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(spec.get("load", 0))]
    for hog in hogs:
        hog.start()
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    finally:
        for hog in hogs:
            hog.terminate()
    return done.stdout.strip().splitlines()[-1]


def compare(reference: str, other: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    def weights(unet: str) -> dict[str, Any]:
        return load_file(next(str(p) for p in Path(unet).glob("*.safetensors")))

    first, second = weights(reference), weights(other)
    largest = max(float((first[k] - second[k]).abs().max()) for k in first)
    return {"identical": largest == 0.0, "max_abs_difference": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        unets = {}
        for name, spec in VARIANTS.items():
            started = time.perf_counter()
            unets[name] = run_variant(name, spec, args.steps, work)
            seconds = round(time.perf_counter() - started, 1)
            rows[name] = {"seconds": seconds, **compare(unets["reference"], unets[name])}
            print(f"{name:12s} {rows[name]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
