"""Stages 1-2 flows: captions -> nouns table -> Grounded-SAM mask cache.

    tokencompose nouns -p tiny --input data/manifest.jsonl
    tokencompose masks -p sd14 masks.box_threshold=0.3
    tokencompose masks -p sd14 --input coco_gsam/metadata.jsonl   # import the authors' released masks

Outputs: ``<root>/nouns/nouns-<key>/`` (key: the nouns settings and the
manifest's content) and ``<root>/masks/masks-<key>/`` (key: the mask settings;
the cache is filled shard by shard, so a larger manifest extends it).
"""

from __future__ import annotations

from prefect import flow

from tasks.common import recompute_unless
from tasks.preprocess import import_reference_task, mask_shard_task, nouns_task
from tokencompose_core import outputs, storage
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.grounding import plan_masks
from tokencompose_core.identity import uri_hash
from tokencompose_core.manifest import masks_input_kind
from tokencompose_core.mask_cache import cache_identity
from tokencompose_core.stages import stage_fingerprint


@flow(name="nouns", log_prints=True)
def nouns_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 1. ``input_uri``: the manifest (default ``nouns.manifest`` of the profile)."""
    config = load_config(profile, overrides)
    manifest_uri = input_uri or config.nouns.manifest
    if not manifest_uri:
        raise ValueError("no manifest: pass --input <manifest.jsonl|.parquet> or set nouns.manifest")
    storage.check_input(manifest_uri, config.storage)
    digest, fingerprint = uri_hash(manifest_uri), stage_fingerprint(config, "nouns")
    max_pixels = config.masks.max_image_pixels  # the decoding guard for CLIP caption choice
    out_dir = outputs.output_folder(config, "nouns", "nouns", [fingerprint, digest, max_pixels])
    result = recompute_unless(nouns_task, outputs.keep_if_whole(out_dir))(
        manifest_uri, digest, out_dir, config.nouns, config.models, max_pixels, config.storage.allowed_roots,
        fingerprint)
    outputs.seal(out_dir, config, "nouns", fingerprint, {"manifest": manifest_uri, "manifest_digest": digest})
    print(f"nouns: {result['rows']} rows for {result['images']} images, {result['rejects']} rejects")
    return {"manifest_uri": manifest_uri, "output_uri": out_dir, **result}


@flow(name="masks", log_prints=True)
def masks_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 2, one task per shard.

    ``input_uri``: the nouns table (default: stage 1's output for these settings),
    or the reference's ``metadata.jsonl`` (+ mask PNGs beside it), whose released
    masks are then imported into the cache instead of computed.
    """
    config = load_config(profile, overrides)
    source = input_uri or storage.join(outputs.current(config, "nouns"), "nouns.parquet")
    storage.check_input(source, config.storage)
    if masks_input_kind(source) == "reference":
        return _import_reference(source, config)
    fingerprint = stage_fingerprint(config, "masks")
    cache_uri = outputs.output_folder(config, "masks", "masks", fingerprint)
    outputs.keep_if_whole(cache_uri)  # a damaged shard is removed, so its shard task runs again
    plan = plan_masks(source, cache_uri, config.masks.shard_size, fingerprint)
    futures = [recompute_unless(mask_shard_task, shard.committed).submit(
                   source, cache_uri, shard.name, shard.image_ids, shard.inputs_digest, config.models, config.masks,
                   fingerprint)
               for shard in plan]
    results = [future.result() for future in futures]
    outputs.seal(cache_uri, config, "masks", fingerprint, {"nouns": source, "nouns_digest": uri_hash(source)})
    summary = {
        "nouns_uri": source,
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


def _import_reference(metadata_uri: str, config: PipelineConfig) -> dict:
    digest = uri_hash(metadata_uri)
    fingerprint = f"reference-{digest}"
    allow_absolute, roots = config.nouns.allow_absolute_image_paths, config.storage.allowed_roots
    # The paths it may read decide its rejects; counted when they restrict, as in stage 1's key.
    rules = [] if allow_absolute and not roots else [{"allow_absolute_image_paths": allow_absolute, "roots": roots}]
    cache_uri = outputs.output_folder(config, "masks", "reference", [fingerprint, config.masks.shard_size, *rules])
    result = recompute_unless(import_reference_task, outputs.keep_if_whole(cache_uri))(
        metadata_uri, digest, cache_uri, config.masks.shard_size, allow_absolute, roots, fingerprint)
    outputs.seal(cache_uri, config, "masks", fingerprint, {"metadata": metadata_uri, "metadata_digest": digest})
    print(f"masks: imported {result['images']} reference images into {cache_uri}")
    return {"metadata_uri": metadata_uri, "cache_uri": cache_uri, "shards": len(result["shards"]),
            "images": result["images"], "cache_identity": cache_identity(cache_uri)}


@flow(name="preprocess", log_prints=True)
def preprocess_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stages 1 and 2 chained: manifest -> nouns table -> mask cache."""
    nouns = nouns_flow(profile, overrides, input_uri)
    masks = masks_flow(profile, overrides, nouns["nouns_uri"])
    return {"nouns": nouns, "masks": masks}
