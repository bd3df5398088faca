"""How a stage scales with Dask workers: 1, 2, ... N workers (or one per GPU), the same work.

The ``--workers`` / ``--gpus`` mode of ``bench/masks_throughput.py`` and
``bench/sample_throughput.py``. Each size runs the real stage flow of the tiny profile
(random weights, offline) on a local Dask cluster of that size, from a fresh storage root,
on ``images`` photos split into one shard per image (masks) or one shard per image pair
(sampling). Per size: the stage's images/s as the stage reports it (images over the
slowest shard's seconds: the compute) and over the flow's wall time (with the cluster
start and Prefect), and each as a ratio to the first size. A Prefect test server runs for
the measurement; nothing is cached across sizes. The mask stage reads a nouns table
written here (the captions' nouns are known), so no tagger is needed.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

# Captions of the four photos, and their nouns (what stage 1 finds in them).
CAPTIONS = {"An astronaut holding a flag.": ["astronaut", "flag"], "A cat next to a wall.": ["cat", "wall"],
            "A cup of coffee with a spoon.": ["cup", "coffee", "spoon"],
            "A rocket on a launch pad.": ["rocket", "launch pad"]}


def _nouns_table(folder: Path, images: int) -> str:
    """``images`` photos (the four of scikit-image in turn) and their nouns table (stage 1's
    output format) -> the table's path."""
    import pandas as pd
    import skimage.data
    from PIL import Image

    from tokencompose_core.manifest import NOUNS_SCHEMA
    from tokencompose_core.mask_cache import rejects_frame
    from tokencompose_core.models import clip_tokenizer
    from tokencompose_core.stages.nouns import write_nouns
    from tokencompose_core.text import token_positions

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    captions, tokenizer, rows = list(CAPTIONS), clip_tokenizer(), []
    for index in range(images):
        image = folder / f"img{index}.png"
        Image.fromarray(photos[index % 4]).convert("RGB").resize((160, 120)).save(image)
        caption = captions[index % 4]
        rows += [{"image_id": f"img{index}", "image_uri": str(image), "caption": caption, "noun": noun,
                  "token_positions": list(token_positions(caption, noun, tokenizer))} for noun in CAPTIONS[caption]]
    return write_nouns(pd.DataFrame(rows, columns=NOUNS_SCHEMA.names), rejects_frame([]),
                       str(folder / "nouns"))["nouns_uri"]


def measure(stage: str, size: int, gpus: bool, images: int, work: Path) -> dict[str, float]:
    """One cluster size: the stage's images/s, computed and over wall time."""
    from flows.preprocess import masks_flow
    from flows.sample import sample_flow
    from tasks.common import configured
    from tokencompose_core.config import load_config

    root = work / f"{stage}-{'gpus' if gpus else 'workers'}-{size}"
    root.mkdir(parents=True)
    runner = [f"orchestration.gpus={size}"] if gpus else ["orchestration.gpus=0", f"orchestration.dask_workers={size}"]
    overrides = [f"storage.root={root}", "orchestration.task_runner=dask", "orchestration.dask_threads_per_worker=1",
                 *runner, "masks.shard_size=1", "masks.batch_size=1", f"sample.num_shards={max(1, images // 2)}",
                 f"sample.max_prompts={images}", "sample.images_per_prompt=1", "sample.num_inference_steps=4",
                 "sample.batch_size=1"]
    config = load_config("tiny", overrides)
    nouns = _nouns_table(root, images) if stage == "masks" else None
    started = time.perf_counter()
    if stage == "masks":
        summary = configured(masks_flow, config)("tiny", overrides, nouns)
    else:
        summary = configured(sample_flow, config)("tiny", overrides)
    return {"images_per_s": summary["images_per_s"], "wall_images_per_s": images / (time.perf_counter() - started)}


def scaling(stage: str, sizes: list[int], gpus: bool, images: int) -> dict[str, Any]:
    """``stage`` ("masks" or "sample") on each cluster size in turn; per size its images/s
    and the ratios to the first size."""
    from prefect.testing.utilities import prefect_test_harness

    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as work, prefect_test_harness(server_startup_timeout=180):
        for size in sizes:
            rows[str(size)] = measure(stage, size, gpus, images, Path(work))
    first = dict(rows[str(sizes[0])])
    for row in rows.values():
        row.update({f"{key}_ratio": round(row[key] / value, 3) for key, value in first.items() if value})
    return {"stage": stage, "unit": "gpus" if gpus else "workers", "images": images, "sizes": rows}


def scaling_requested(args: Any) -> bool:
    """Whether a throughput script was asked for worker scaling (``--workers`` or ``--gpus``)."""
    return bool(args.workers or args.gpus)


def add_scaling_arguments(parser: Any) -> None:
    """The worker-scaling options both throughput scripts take."""
    group = parser.add_argument_group("worker scaling (the stage's flow on a local Dask cluster of each size)")
    sizes = group.add_mutually_exclusive_group()
    sizes.add_argument("--workers", type=int, nargs="+", default=None, help="CPU worker counts, e.g. 1 2")
    sizes.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU counts: one worker per GPU, e.g. 1 2 4 8")
    group.add_argument("--images", type=int, default=8, help="images per size")


def run_scaling(stage: str, args: Any) -> dict[str, Any]:
    """The scaling mode's result for the parsed ``args``."""
    return scaling(stage, args.gpus or args.workers, args.gpus is not None, args.images)
