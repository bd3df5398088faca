"""Stages 1-2 flows: captions -> nouns table -> Grounded-SAM mask cache.

    tokencompose nouns -p tiny --input data/manifest.jsonl
    tokencompose masks -p sd14 masks.box_threshold=0.3
    tokencompose masks -p sd14 --input coco_gsam/metadata.jsonl   # import the authors' released masks

What each stage reads and writes: ``tokencompose_core.stages.nouns`` and ``.masks``.
"""

from __future__ import annotations

from prefect import flow

from flows.stage import run_stage


@flow(name="nouns", log_prints=True)
def nouns_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 1. ``input_uri``: the manifest (default ``nouns.manifest`` of the profile)."""
    return run_stage("nouns", profile, overrides, input_uri)


@flow(name="masks", log_prints=True)
def masks_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 2, one task per shard. ``input_uri``: the nouns table (default: stage 1's output
    for these settings), or the reference's ``metadata.jsonl`` (+ mask PNGs beside it), whose
    released masks are then imported into the cache instead of computed."""
    return run_stage("masks", profile, overrides, input_uri)


@flow(name="preprocess", log_prints=True)
def preprocess_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stages 1 and 2 chained: manifest -> nouns table -> mask cache."""
    nouns = nouns_flow(profile, overrides, input_uri)
    masks = masks_flow(profile, overrides, nouns["nouns_uri"])
    return {"nouns": nouns, "masks": masks}
