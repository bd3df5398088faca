"""Stages on a local Dask cluster of one worker per GPU: each shard and score unit runs on its worker's
own device, and the mask cache is the one a single process writes."""

from __future__ import annotations

import json
from pathlib import Path

import skimage.data
from PIL import Image

from flows.preprocess import masks_flow, nouns_flow
from helpers import flow_task_states
from tasks.common import configured
from tokencompose_core import mask_cache, storage
from tokencompose_core.config import load_config

PHOTOS = {"astronaut": "An astronaut holding a flag.", "coffee": "A cup of coffee with a spoon."}


def _manifest(folder: Path) -> str:
    rows = []
    for name, caption in PHOTOS.items():
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((64, 48)).save(folder / f"{name}.png")
        rows.append({"image": f"{name}.png", "captions": [caption]})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder / "manifest.jsonl")


def _shards(cache_uri: str) -> dict[str, list[dict]]:
    """Every committed shard's rows, as plain values (the cache's whole content)."""
    completed = mask_cache.completed_shards(cache_uri)
    return {name: storage.read_parquet(storage.join(cache_uri, "shards", f"{name}.parquet"))
            .sort_values(["image_id", "noun"], na_position="first").astype(str).to_dict("records")
            for name in completed}


def test_each_gpu_worker_runs_its_units_on_its_own_device_and_writes_what_one_process_writes(
        prefect_harness, tmp_path):
    """orchestration.gpus=2: the local cluster has one worker per GPU, worker i seeing only GPU i,
    and mask shards, sample shards and score units (the FID reference statistics too) alike run
    where their worker's CUDA_VISIBLE_DEVICES points (on this CPU machine the work itself runs on
    the CPU). The mask cache the workers write is the one a single process writes, and a second
    run is all cache hits. One cluster, of the spec that setting gives, serves every flow here
    (through ``orchestration.dask_address``): each cluster start would cost seconds of imports."""
    from distributed import SpecCluster

    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow
    from tasks.common import task_runner

    settings = ["masks.shard_size=1", "masks.batch_size=1"]
    # One thread: tiny models built by concurrent threads get different random
    # weights (the global torch RNG is shared), which is not what is compared here.
    single = [f"storage.root={tmp_path / 'single'}", *settings, "orchestration.max_workers=1"]
    manifest = _manifest(tmp_path)
    overrides = [f"storage.root={tmp_path / 'root'}", *settings, "orchestration.task_runner=dask",
                 "orchestration.gpus=2", "sample.num_shards=2", "sample.max_prompts=2", "sample.images_per_prompt=1",
                 "sample.num_inference_steps=2", f"score.fid_reference={manifest}"]
    runner = task_runner(load_config("tiny", overrides))
    assert runner.cluster_class == "distributed.SpecCluster"  # no dask-cuda here
    nouns = nouns_flow("tiny", single, manifest)["nouns_uri"]
    local = configured(masks_flow, load_config("tiny", single))("tiny", single, nouns)
    with SpecCluster(**runner.cluster_kwargs) as cluster:
        overrides.append(f"orchestration.dask_address={cluster.scheduler_address}")
        config = load_config("tiny", overrides)
        masks = configured(masks_flow, config)
        masked = masks("tiny", overrides, nouns)
        assert sorted(run["visible_gpus"] for run in masked["shard_runs"]) == ["0", "1"]
        assert all(run["images_per_s"] > 0 for run in masked["shard_runs"]) and masked["images_per_s"] > 0
        assert masked["shards"] == local["shards"] == 2
        assert mask_cache.completed_shards(masked["cache_uri"]) == mask_cache.completed_shards(local["cache_uri"])
        assert _shards(masked["cache_uri"]) == _shards(local["cache_uri"])
        # Task results written on the workers land in the profile's result storage.
        again = masks("tiny", overrides, nouns, return_state=True)
        assert set(flow_task_states(again.state_details.flow_run_id)) == {"Cached"}

        sampled = configured(sample_flow, config)("tiny", overrides)
        shard_stats = [storage.read_json(str(path))
                       for path in sorted(Path(sampled["output_uri"], "shards").glob("stats-*"))]
        assert sorted(stats["visible_gpus"] for stats in shard_stats) == ["0", "1"]
        assert {stats["device"] for stats in shard_stats} == {"cpu"} and sampled["images_per_s"] > 0

        units = configured(evaluate_flow, config)("tiny", overrides, sampled["output_uri"])["unit_runs"]
    assert sorted(unit["step"] for unit in units) == ["clip", "detect", "fid", "fid_reference", "multigen",
                                                      "segmentation"]
    assert {unit["visible_gpus"] for unit in units} == {"0", "1"} and {unit["device"] for unit in units} == {"cpu"}
