"""Stages 1-2 flows: captions -> nouns table -> Grounded-SAM mask cache.

    tokencompose nouns -p tiny --input data/manifest.jsonl
    tokencompose masks -p sd14 masks.box_threshold=0.3
    tokencompose masks -p sd14 --input coco_gsam/metadata.jsonl   # import the authors' released masks
"""

from __future__ import annotations

import hashlib

from prefect import Task, flow

from tasks.common import stage_fingerprint
from tasks.preprocess import import_reference_task, mask_shard_task, nouns_task
from tokencompose_core import mask_cache, storage
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.grounding import masks_fingerprint, plan_shards, shard_inputs_digest
from tokencompose_core.models import fingerprint as models_fingerprint


def _refreshed_if(missing: bool, task: Task) -> Task:
    """``task``, forced to run when its output is missing from storage (deleted by hand,
    or a run killed before the commit) even if Prefect holds a cached result for it."""
    return task.with_options(refresh_cache=True) if missing else task


def nouns_dir(config: PipelineConfig) -> str:
    return storage.join(config.storage.root, "nouns")


def masks_dir(config: PipelineConfig) -> str:
    return storage.join(config.storage.root, "masks")


@flow(name="nouns", log_prints=True)
def nouns_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 1. ``input_uri``: the manifest (default ``nouns.manifest`` of the profile)."""
    config = load_config(profile, overrides)
    manifest_uri = input_uri or config.nouns.manifest
    if not manifest_uri:
        raise ValueError("no manifest: pass --input <manifest.jsonl|.parquet> or set nouns.manifest")
    storage.check_input(manifest_uri, config.storage)
    digest = hashlib.sha256(storage.read_bytes(manifest_uri)).hexdigest()[:16]
    out_dir = nouns_dir(config)
    task = _refreshed_if(not storage.exists(storage.join(out_dir, "nouns.parquet")), nouns_task)
    result = task(manifest_uri, digest, out_dir, config.nouns.model_dump(mode="json"),
                  config.models.model_dump(mode="json"), config.masks.max_image_pixels,
                  stage_fingerprint(config, "nouns"))
    print(f"nouns: {result['rows']} rows for {result['images']} images, {result['rejects']} rejects")
    return {"manifest_uri": manifest_uri, **result}


@flow(name="masks", log_prints=True)
def masks_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 2, one task per shard.

    ``input_uri``: the nouns table (default: stage 1's output), or the reference's
    ``metadata.jsonl`` (+ mask PNGs beside it), whose released masks are then
    imported into the cache instead of computed.
    """
    config = load_config(profile, overrides)
    source = storage.check_input(input_uri or storage.join(nouns_dir(config), "nouns.parquet"), config.storage)
    if source.endswith(".jsonl"):
        return _import_reference(source, config)
    nouns_uri, cache_uri = source, masks_dir(config)
    shards = plan_shards(storage.read_parquet(nouns_uri), config.masks.shard_size)
    fingerprint = masks_fingerprint(models_fingerprint(config.models), config.masks)
    models, masks = config.models.model_dump(mode="json"), config.masks.model_dump(mode="json")
    completed = _drop_stale_shards(cache_uri, {name for name, _ in shards})
    futures = [
        _refreshed_if(name not in completed, mask_shard_task).submit(
            nouns_uri, cache_uri, name, rows["image_id"].drop_duplicates().tolist(), shard_inputs_digest(rows),
            models, masks, fingerprint)
        for name, rows in shards
    ]
    results = [future.result() for future in futures]
    summary = {
        "nouns_uri": nouns_uri,
        "cache_uri": cache_uri,
        "fingerprint": fingerprint,
        "shards": len(results),
        "shards_skipped": sum(bool(r["skipped"]) for r in results),
        "images": sum(r["images"] for r in results),
        "rows": sum(r["rows"] for r in results),
        "rejects": sum(r["rejects"] for r in results),
    }
    print(f"masks: {summary}")
    return summary


def _drop_stale_shards(cache_uri: str, planned: set[str]) -> dict[str, dict]:
    """Withdraw shards of an earlier, larger input; returns the completed shards kept."""
    completed = mask_cache.completed_shards(cache_uri)
    for stale in sorted(set(completed) - planned):
        mask_cache.remove_shard(cache_uri, stale)
    return {name: record for name, record in completed.items() if name in planned}


def _import_reference(metadata_uri: str, config: PipelineConfig) -> dict:
    cache_uri = masks_dir(config)
    digest = hashlib.sha256(storage.read_bytes(metadata_uri)).hexdigest()[:16]
    task = _refreshed_if(not mask_cache.completed_shards(cache_uri), import_reference_task)
    result = task(metadata_uri, digest, cache_uri, config.masks.shard_size, f"reference-{digest}")
    _drop_stale_shards(cache_uri, set(result["shards"]))
    print(f"masks: imported {result['images']} reference images into {cache_uri}")
    return {"metadata_uri": metadata_uri, "cache_uri": cache_uri, "shards": len(result["shards"]),
            "images": result["images"]}


@flow(name="preprocess", log_prints=True)
def preprocess_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stages 1 and 2 chained: manifest -> nouns table -> mask cache."""
    nouns = nouns_flow(profile, overrides, input_uri)
    masks = masks_flow(profile, overrides, nouns["nouns_uri"])
    return {"nouns": nouns, "masks": masks}
