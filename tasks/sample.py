"""Prefect tasks of stage 4: one cached task per sample shard, and the index merge."""

from __future__ import annotations

from typing import Any

from tasks.common import retry_batch_size, stage_task
from tokencompose_core.config import PipelineConfig
from tokencompose_core.sampling import load_prompts, merge_shards, sample


@stage_task
def sample_shard(config: dict[str, Any], model_dir: str, out_uri: str, unet_dir: str | None,
                 shard: tuple[int, int], fingerprint: str) -> str:
    """Sample one shard of the profile's prompts; returns the shard's index URI."""
    settings = PipelineConfig.model_validate(config)
    # After a CUDA out-of-memory failure the retry runs with a halved batch (same images).
    settings.sample.batch_size = retry_batch_size(settings.sample.batch_size)
    prompts = load_prompts(settings.sample.prompts, settings.sample.max_prompts)
    return sample(settings, model_dir, out_uri, prompts, unet_dir=unet_dir, shard=tuple(shard))


@stage_task
def merge_sample_shards(out_uri: str, num_shards: int, shard_indexes: list[str], fingerprint: str) -> str:
    """Join the shards' indexes into ``index.parquet`` (``shard_indexes`` orders the DAG)."""
    return merge_shards(out_uri, num_shards)
