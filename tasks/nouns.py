"""Prefect task of stage 1: the nouns table (one unit)."""

from __future__ import annotations

from typing import Any

from tasks.common import recompute_unless, stage_task
from tokencompose_core.config import ModelsConfig, NounsConfig, PipelineConfig
from tokencompose_core.stages.nouns import NounsPlan, build_nouns


@stage_task
def nouns_task(manifest_uri: str, manifest_digest: str, out_dir: str, nouns: NounsConfig, models: ModelsConfig,
               max_image_pixels: int, allowed_roots: list[str], fingerprint: str) -> dict[str, Any]:
    """Stage 1; ``manifest_digest`` keys the cache on the manifest's content, not just its URI."""
    return build_nouns(manifest_uri, out_dir, nouns, models, max_image_pixels, allowed_roots)


def run_units(config: PipelineConfig, plan: NounsPlan) -> dict[str, Any]:
    return recompute_unless(nouns_task, plan.whole)(
        plan.manifest_uri, plan.manifest_identity, plan.out_uri, config.nouns, config.models,
        config.masks.max_image_pixels, config.storage.allowed_roots, plan.fingerprint)
