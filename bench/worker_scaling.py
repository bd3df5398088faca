"""How the mask and sample stages scale with Dask workers: 1, 2, ... N workers, the same work.

    python bench/worker_scaling.py [--workers 1 2] [--images 8] [--out scaling.json]
    python bench/worker_scaling.py --gpus 1 2 4 8      # on a GPU machine: one worker per GPU

Runs the real masks and sample flows of the tiny profile (random weights, offline) on a
local Dask cluster of each size, from a fresh storage root each time, on a manifest of
``--images`` photos split into one shard per image (masks) and one shard per image pair
(sampling). Reports per size the stage's images/s as the stages report it (images over
the slowest shard's seconds: the compute) and over the flow's wall time (with the
cluster start and Prefect), and each as a ratio to one worker. A Prefect test server
runs for the measurement; nothing is cached across sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402

CAPTIONS = ["An astronaut holding a flag.", "A cat next to a wall.", "A cup of coffee with a spoon.",
            "A rocket on a launch pad."]


def _manifest(folder: Path, images: int) -> str:
    import skimage.data
    from PIL import Image

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rows = []
    for index in range(images):
        Image.fromarray(photos[index % 4]).convert("RGB").resize((160, 120)).save(folder / f"img{index}.png")
        rows.append({"id": f"img{index}", "image": f"img{index}.png", "captions": [CAPTIONS[index % 4]]})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder / "manifest.jsonl")


def measure(workers: int, gpus: bool, images: int, work: Path) -> dict[str, float]:
    """One cluster size: the masks and sample stages' images/s, computed and over wall time."""
    from flows.preprocess import masks_flow, nouns_flow
    from flows.sample import sample_flow
    from tasks.common import configured
    from tokencompose_core.config import load_config

    root = work / f"{'gpus' if gpus else 'workers'}-{workers}"
    root.mkdir(parents=True)
    runner = [f"orchestration.gpus={workers}"] if gpus else ["orchestration.gpus=0", f"orchestration.dask_workers={workers}"]
    overrides = [f"storage.root={root}", "orchestration.task_runner=dask", "orchestration.dask_threads_per_worker=1",
                 *runner, "masks.shard_size=1", "masks.batch_size=1", f"sample.num_shards={max(1, images // 2)}",
                 f"sample.max_prompts={images}", "sample.images_per_prompt=1", "sample.num_inference_steps=4",
                 "sample.batch_size=1"]
    config = load_config("tiny", overrides)
    nouns = nouns_flow("tiny", overrides, _manifest(root, images))["nouns_uri"]
    started = time.perf_counter()
    masked = configured(masks_flow, config)("tiny", overrides, nouns)
    masks_wall = time.perf_counter() - started
    started = time.perf_counter()
    sampled = configured(sample_flow, config)("tiny", overrides)
    sample_wall = time.perf_counter() - started
    return {"masks_images_per_s": masked["images_per_s"], "masks_wall_images_per_s": masked["images"] / masks_wall,
            "sample_images_per_s": sampled["images_per_s"], "sample_wall_images_per_s": images / sample_wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="CPU worker counts")
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU counts instead: one worker per GPU")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from prefect.testing.utilities import prefect_test_harness

    sizes = args.gpus or args.workers
    rows = {}
    with tempfile.TemporaryDirectory() as work, prefect_test_harness(server_startup_timeout=180):
        for size in sizes:
            rows[str(size)] = measure(size, args.gpus is not None, args.images, Path(work))
    first = dict(rows[str(sizes[0])])
    for row in rows.values():
        row.update({f"{key}_ratio": round(row[key] / value, 3) for key, value in first.items() if value})
    return emit({"unit": "gpus" if args.gpus else "workers", "images": args.images, "sizes": rows}, args.out)


if __name__ == "__main__":
    main()
