"""Sampling throughput: the reference's way (a StableDiffusionPipeline call per image,
batch 1) against our batched sampler, same model, same process, same settings; or the
sample stage on 1, 2, ... N workers.

    python bench/sample_throughput.py                       # tiny model on the CPU
    python bench/sample_throughput.py --device cuda --full  # SD 1.4 architecture, random
        weights (configs/models/sd14-random), 512 px, fp16, 20 steps, batch 1 vs 8
    python bench/sample_throughput.py --workers 1 2         # the sample flow on 1 and 2 Dask workers
    python bench/sample_throughput.py --gpus 1 2 4 8        # ... on one worker per GPU

Every variant gets a warm-up batch first; timings cover denoising, VAE decoding and
(for our sampler) PNG encoding + atomic writes. Writes JSON to ``--out``.
Imports no Prefect, but in the scaling mode (bench/worker_scaling.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from bench.worker_scaling import add_scaling_arguments, run_scaling, scaling_requested  # noqa: E402
import torch  # noqa: E402

from tokencompose_core.config import load_config  # noqa: E402
from tokencompose_core.devices import resolve_device  # noqa: E402
from tokencompose_core.models import resolve_diffusion_dir  # noqa: E402
from tokencompose_core.sampling import (  # noqa: E402
    build_scheduler,
    generate_images,
    load_parts,
    load_prompts,
    resolve_dtype,
    shard_items,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_style(parts: Any, config: Any, prompts: list, device: torch.device) -> float:
    """images/s of one StableDiffusionPipeline call per image (how the reference samples)."""
    from diffusers import StableDiffusionPipeline

    cfg = config.sample
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=build_scheduler(cfg.scheduler, parts.scheduler.config,
                                                                             parts.stock_scheduler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    side = cfg.resolution or parts.sample_size

    def one(text: str, seed: int) -> None:
        pipe(text, height=side, width=side, num_inference_steps=cfg.num_inference_steps,
             guidance_scale=cfg.guidance_scale, generator=torch.Generator("cpu").manual_seed(seed))

    one(prompts[0].text, 0)  # warm-up
    _sync(device)
    started = time.perf_counter()
    count = 0
    for prompt in prompts:
        for index in range(cfg.images_per_prompt):
            one(prompt.text, index)
            count += 1
    _sync(device)
    return count / (time.perf_counter() - started)


def ours(parts: Any, config: Any, prompts: list, device: torch.device, batch_size: int, out: str) -> float:
    """images/s of our sampler at ``batch_size`` (after one warm-up batch)."""
    config.sample.batch_size = batch_size
    warm = shard_items(prompts[:1], batch_size, config.sample.seed + 1, f"{out}/warm", (0, 1))
    generate_images(parts, config.sample, warm[:batch_size], device)
    items = shard_items(prompts, config.sample.images_per_prompt, config.sample.seed, out, (0, 1))
    seconds = generate_images(parts, config.sample, items, device)
    return len(items) / seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="SD 1.4 architecture, 512 px, fp16, 20 steps")
    parser.add_argument("--batch", type=int, default=8, help="our batch size")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default 2 full, 4 tiny)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--out", default=None, help="JSON output path")
    add_scaling_arguments(parser)
    args = parser.parse_args(argv)
    if scaling_requested(args):
        return emit(run_scaling("sample", args), args.out)

    prompt_count = args.prompts or (2 if args.full else 4)
    overrides = [f"sample.images_per_prompt={args.images_per_prompt}", f"sample.device={args.device}",
                 "sample.scheduler=pndm", "sample.guidance_scale=7.5"]
    if args.full:
        overrides += ["models.kind=tiny", "models.diffusion=sd14-random", "sample.resolution=512",
                      "sample.num_inference_steps=20", "sample.mixed_precision=fp16"]
    else:
        overrides += ["sample.num_inference_steps=10"]
    config = load_config("tiny", overrides)
    device = resolve_device(args.device)
    dtype = resolve_dtype(config.sample.mixed_precision, device)
    started = time.perf_counter()
    parts = load_parts(resolve_diffusion_dir(config.models), None, device, dtype)
    load_seconds = time.perf_counter() - started
    prompts = load_prompts("multigen:coco", prompt_count)
    images = prompt_count * args.images_per_prompt
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": config.models.diffusion, "resolution": config.sample.resolution or parts.sample_size,
        "steps": config.sample.num_inference_steps, "dtype": str(dtype).replace("torch.", ""),
        "guidance_scale": config.sample.guidance_scale, "scheduler": config.sample.scheduler,
        "images": images, "threads": torch.get_num_threads(), "model_load_s": round(load_seconds, 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_reference:
            result["reference_pipeline_b1_images_per_s"] = reference_style(parts, config, prompts, device)
        result["ours_b1_images_per_s"] = ours(parts, config, prompts, device, 1, f"{tmp}/b1")
        result[f"ours_b{args.batch}_images_per_s"] = ours(parts, config, prompts, device, args.batch,
                                                           f"{tmp}/b{args.batch}")
    batched = result[f"ours_b{args.batch}_images_per_s"]
    result[f"speedup_b{args.batch}_vs_ours_b1"] = batched / result["ours_b1_images_per_s"]
    if "reference_pipeline_b1_images_per_s" in result:
        result[f"speedup_b{args.batch}_vs_reference"] = batched / result["reference_pipeline_b1_images_per_s"]
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return emit(result, args.out)


if __name__ == "__main__":
    main()
