"""Prefect tasks of the embedded demo: thin cached wrappers over tokencompose_core.demo.

Each takes the demo profile as a plain dict and a ``fingerprint`` (the model
profile's identity, :func:`tokencompose_core.models.fingerprint`), so a second
``tokencompose demo`` with the same profile is all cache hits.
"""

from __future__ import annotations

from typing import Any

from tasks.common import stage_task
from tokencompose_core import demo
from tokencompose_core.config import PipelineConfig


def _config(config: dict[str, Any]) -> PipelineConfig:
    return PipelineConfig.model_validate(config)


@stage_task
def build_world(config: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """The synthetic world: manifests, nouns, exact-mask caches, test prompts."""
    return demo.build_world(_config(config))


@stage_task
def train_model(config: dict[str, Any], model: str, cache_uri: str, init_unet: str | None,
                fingerprint: str) -> dict[str, Any]:
    """Pre-train the base model or fine-tune one seed, plain or grounded."""
    return demo.train_model(_config(config), model, cache_uri, init_unet)


@stage_task
def sample_model(config: dict[str, Any], model: str, unet_uri: str, prompts_uri: str, fingerprint: str) -> str:
    """Sample the test prompts from one model (paired noise); the index URI."""
    return demo.sample_model(_config(config), model, unet_uri, prompts_uri)


@stage_task
def score_model(config: dict[str, Any], model: str, index_uri: str, unet_uri: str, test_cache_uri: str,
                prompts_uri: str, fingerprint: str) -> str:
    """Detect, MultiGen per prompt group, attention mIoU; the scores.json URI."""
    return demo.score_model(_config(config), model, index_uri, unet_uri, test_cache_uri, prompts_uri)


@stage_task
def write_results(config: dict[str, Any], scores_uris: dict[str, str], train_uris: dict[str, str],
                  fingerprint: str) -> dict[str, Any]:
    """The comparison table, paired differences, grids, overlays, loss curves."""
    return demo.write_results(_config(config), scores_uris, train_uris)
