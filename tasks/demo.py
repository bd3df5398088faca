"""Prefect tasks of the embedded demo: thin cached wrappers over tokencompose_core.demo.

Each takes the demo profile (left out of the cache key, as every typed section is)
and a ``fingerprint``: the output folder it writes, whose name carries the digest of
everything that determines the output (:func:`tokencompose_core.demo.model_paths`).
So a second ``tokencompose demo`` with the same profile is all cache hits, and a
changed setting (say the grounding weight) reruns only the models it changes.
"""

from __future__ import annotations

from typing import Any

from tasks.common import stage_task
from tokencompose_core import demo
from tokencompose_core.config import PipelineConfig


@stage_task
def build_world(config: PipelineConfig, fingerprint: str) -> dict[str, Any]:
    """The synthetic world: manifests, nouns, exact-mask caches, test prompts."""
    return demo.build_world(config)


@stage_task
def train_model(config: PipelineConfig, model: str, cache_uri: str, init_unet: str | None,
                fingerprint: str) -> dict[str, Any]:
    """Pre-train the base model or fine-tune one seed, plain or grounded."""
    return demo.train_model(config, model, cache_uri, init_unet)


@stage_task
def sample_model(config: PipelineConfig, model: str, unet_uri: str, prompts_uri: str, fingerprint: str) -> str:
    """Sample the test prompts from one model (paired noise); the index URI."""
    return demo.sample_model(config, model, unet_uri, prompts_uri)


@stage_task
def score_model(config: PipelineConfig, model: str, index_uri: str, unet_uri: str, test_cache_uri: str,
                prompts_uri: str, fingerprint: str) -> str:
    """Detect, MultiGen per prompt group, attention mIoU; the scores.json URI."""
    return demo.score_model(config, model, index_uri, unet_uri, test_cache_uri, prompts_uri)


@stage_task
def write_results(config: PipelineConfig, scores_uris: dict[str, str], train_uris: dict[str, str],
                  fingerprint: str) -> dict[str, Any]:
    """The comparison table, paired differences, grids, overlays, loss curves."""
    return demo.write_results(config, scores_uris, train_uris)
