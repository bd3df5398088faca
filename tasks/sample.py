"""Prefect tasks of stage 4: one cached task per sample shard, and the index merge."""

from __future__ import annotations

from tasks.common import recompute_unless, retry_batch_size, stage_task
from tokencompose_core.config import ModelsConfig, PipelineConfig, SampleConfig
from tokencompose_core.sampling import load_prompts
from tokencompose_core.stages.sample import SamplePlan, merge_shards, sample


@stage_task
def sample_shard(sample_settings: SampleConfig, models: ModelsConfig, model_dir: str, unet_dir: str | None,
                 model_identity: str, out_uri: str, shard: tuple[int, int], fingerprint: str) -> str:
    """Sample one shard of the prompts; returns the shard's index URI.

    ``model_identity`` (the weights' content identity) keys the cache on the model
    itself, not on where it lies.
    """
    # After a CUDA out-of-memory failure the retry runs with a halved batch (same images).
    settings = sample_settings.model_copy(update={"batch_size": retry_batch_size(sample_settings.batch_size)})
    prompts = load_prompts(settings.prompts, settings.max_prompts)
    return sample(settings, models, model_dir, out_uri, prompts, unet_dir=unet_dir, shard=tuple(shard))


@stage_task
def merge_sample_shards(out_uri: str, num_shards: int, shard_indexes: list[str], fingerprint: str) -> str:
    """Join the shards' indexes into ``index.parquet`` (``shard_indexes`` orders the DAG)."""
    return merge_shards(out_uri, num_shards)


def run_units(config: PipelineConfig, plan: SamplePlan) -> str:
    futures = [recompute_unless(sample_shard, plan.whole).submit(
                   config.sample, config.models, plan.model_dir, plan.unet_dir, plan.model_identity, plan.out_uri,
                   shard, plan.fingerprint)
               for shard in plan.shards]
    return recompute_unless(merge_sample_shards, plan.whole)(
        plan.out_uri, len(plan.shards), [future.result() for future in futures], plan.fingerprint)
