"""Prefect tasks of stage 2: one cached, retried task per mask shard, or the reference import."""

from __future__ import annotations

from typing import Any

from tasks.common import recompute_unless, retry_batch_size, stage_task
from tokencompose_core import storage
from tokencompose_core.config import MasksConfig, ModelsConfig, PipelineConfig
from tokencompose_core.devices import loaded_once
from tokencompose_core.grounding import GroundedSam
from tokencompose_core.manifest import ImagePaths
from tokencompose_core.stages.masks import MasksPlan, import_reference, reference_paths, run_mask_shard


@stage_task
def import_reference_task(metadata_uri: str, metadata_digest: str, cache_uri: str, shard_size: int,
                          allow_absolute_image_paths: bool, allowed_roots: list[str], models: ModelsConfig,
                          fingerprint: str) -> dict[str, Any]:
    """Stage 2 from the reference's released masks (``metadata.jsonl`` + mask PNGs), reading
    only the image and mask paths a manifest may use (``ImagePaths``); token positions as
    stage 1 records them for the profile's model."""
    from tokencompose_core.stages.nouns import noun_positions

    paths = ImagePaths(allow_absolute_image_paths, tuple(allowed_roots))
    return import_reference(metadata_uri, cache_uri, noun_positions(models), shard_size=shard_size,
                            fingerprint=fingerprint, paths=paths)


def _grounder(models_json: str, masks_json: str) -> GroundedSam:
    # Loaded once per process (loaded_once), shared by every shard task it runs (threads
    # take turns inside GroundedSam); Dask worker processes load their own.
    models, masks = ModelsConfig.model_validate_json(models_json), MasksConfig.model_validate_json(masks_json)
    return GroundedSam.from_config(models, masks)


@stage_task
def mask_shard_task(nouns_uri: str, cache_uri: str, shard_name: str, image_ids: list[str], inputs_digest: str,
                    models: ModelsConfig, masks: MasksConfig, fingerprint: str) -> dict[str, Any]:
    """Ground and commit one shard; a shard already committed for these inputs is skipped.

    Cached on (the shard's image ids and input digest, the stage fingerprint, the
    code); retried on transient errors, with a halved batch after a CUDA
    out-of-memory error.
    """
    nouns = storage.read_parquet(nouns_uri)
    rows = nouns[nouns["image_id"].isin(set(image_ids))]
    models_json, masks_json = models.model_dump_json(), masks.model_dump_json()
    return run_mask_shard(
        rows,
        cache_uri,
        shard_name,
        lambda: loaded_once(_grounder, models_json, masks_json),
        fingerprint,
        retry_batch_size(masks.batch_size),
        masks.max_image_pixels,
    )


def run_units(config: PipelineConfig, plan: MasksPlan) -> list[dict[str, Any]]:
    if plan.reference:
        paths = reference_paths(config)
        return [recompute_unless(import_reference_task, plan.whole)(
            plan.source_uri, plan.source_identity, plan.out_uri, config.masks.shard_size, paths.allow_absolute,
            list(paths.roots), config.models, plan.fingerprint)]
    futures = [recompute_unless(mask_shard_task, shard.committed).submit(
                   plan.source_uri, plan.out_uri, shard.name, shard.image_ids, shard.inputs_digest, config.models,
                   config.masks, plan.fingerprint)
               for shard in plan.shards]
    return [future.result() for future in futures]
