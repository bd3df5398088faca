"""Mask-stage throughput (images/s): Grounded-SAM in one process, or the stage on 1, 2, ... N workers.

    python bench/masks_throughput.py                      # tiny profile, CPU
    python bench/masks_throughput.py --full --device cuda --out masks.json
    python bench/masks_throughput.py --workers 1 2        # the masks flow on 1 and 2 Dask workers
    python bench/masks_throughput.py --gpus 1 2 4 8       # ... on one worker per GPU

Without ``--workers``/``--gpus``: Grounded-SAM's images/s split into detection and segmentation.

``--full`` builds the full-size architectures with random weights (GroundingDINO
Swin-T OGC, SAM ViT-H; no checkpoint, no network) at the reference settings
(800 px detector input, SAM at 1024) and measures batch sizes 1 and 8 under
mixed precision. Random detectors pass the box threshold with most queries, so
``--max-boxes`` (default 8) keeps the number of SAM prompts per image realistic.
Images are COCO-sized (640x480) photos from scikit-image when installed, else
synthetic shapes. Imports neither Prefect nor spaCy (the scaling mode imports Prefect:
bench/worker_scaling.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from bench.worker_scaling import add_scaling_arguments, run_scaling, scaling_requested  # noqa: E402
from tokencompose_core.config import load_config  # noqa: E402
from tokencompose_core.grounding import GroundedSam  # noqa: E402

NOUNS = ["person", "dog", "frisbee"]


def sample_images(count: int, size: tuple[int, int] = (640, 480)) -> list[Image.Image]:
    try:
        import skimage.data

        photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
        photos = [Image.fromarray(p).convert("RGB").resize(size) for p in photos]
    except ImportError:
        rng = np.random.default_rng(0)
        photos = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(4)]
    return [photos[i % len(photos)] for i in range(count)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(grounder: GroundedSam, batch_size: int, batches: int) -> dict[str, float]:
    """Images/s over ``batches`` timed batches after one warm-up batch."""
    images = sample_images(batch_size)
    nouns = [NOUNS] * batch_size
    grounder(images, nouns)  # warm-up: kernels, allocator, autotuning
    detect_s = segment_s = 0.0
    boxes = 0
    for _ in range(batches):
        _sync(grounder.device)
        start = time.perf_counter()
        detections = grounder.detect(images, nouns)
        _sync(grounder.device)
        middle = time.perf_counter()
        for image, found in zip(images, detections):
            grounder.segment(image, found)
        _sync(grounder.device)
        detect_s += middle - start
        segment_s += time.perf_counter() - middle
        boxes += sum(len(found) for found in detections)
    count = batch_size * batches
    return {
        "batch_size": batch_size,
        "images": count,
        "images_per_s": count / (detect_s + segment_s),
        "detect_ms_per_image": 1000 * detect_s / count,
        "segment_ms_per_image": 1000 * segment_s / count,
        "boxes_per_image": boxes / count,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size random-weight architectures (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, default=None, help="timed batches per batch size")
    parser.add_argument("--precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--max-boxes", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    add_scaling_arguments(parser)
    args = parser.parse_args(argv)
    if scaling_requested(args):
        return emit(run_scaling("masks", args), args.out)

    profile = "sd14" if args.full else "tiny"
    precision = args.precision or ("fp16" if args.full else "no")
    config = load_config(profile, [f"masks.device={args.device}", f"masks.mixed_precision='{precision}'",
                                   f"masks.max_boxes={args.max_boxes}"])
    start = time.perf_counter()
    grounder = GroundedSam.from_config(config.models, config.masks, random_weights=args.full)
    build_s = time.perf_counter() - start
    batch_sizes = args.batch_sizes or [1, 8]
    batches = args.batches or (2 if args.full else 3)
    result: dict = {
        "profile": profile,
        "architectures": f"{config.models.grounding_dino.config} + SAM {config.models.sam.model_type}",
        "random_weights": args.full,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "mixed_precision": precision,
        "detector_short_side": config.masks.image_size,
        "image_size": [640, 480],
        "max_boxes": args.max_boxes,
        "build_s": build_s,
        "runs": [],
    }
    for batch_size in batch_sizes:
        try:
            result["runs"].append(measure(grounder, batch_size, batches))
        except Exception as error:  # noqa: BLE001 - record it and go on with the other sizes
            result["runs"].append({"batch_size": batch_size, "error": f"{type(error).__name__}: {error}"})
        if args.device.startswith("cuda"):
            result["runs"][-1]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    return emit(result, args.out)


if __name__ == "__main__":
    main()
