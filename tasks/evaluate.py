"""Prefect tasks of stage 5: detection, MultiGen scores, attention mIoU, the report."""

from __future__ import annotations

import posixpath
from typing import Any

from tasks.common import retry_batch_size, stage_task
from tokencompose_core import storage
from tokencompose_core.config import ModelsConfig, PipelineConfig
from tokencompose_core.evaluation import (
    detect_owlv2,
    heldout_image_ids,
    multigen_scores,
    object_accuracy,
    segmentation_miou,
)
from tokencompose_core.reports import multigen_record, write_report
from tokencompose_core.sampling import load_prompts


@stage_task
def detect(index_uri: str, prompts: str, max_prompts: int | None, models: dict[str, Any], out_uri: str,
           store_threshold: float, batch_size: int, device: str, fingerprint: str) -> str:
    """OWLv2 detections of every sampled image -> detections.parquet URI."""
    return detect_owlv2(index_uri, load_prompts(prompts, max_prompts), ModelsConfig.model_validate(models),
                        out_uri, store_threshold=store_threshold, batch_size=retry_batch_size(batch_size),
                        device=device)


@stage_task
def score_multigen(detections_uri: str, index_uri: str, prompts: str, max_prompts: int | None,
                   threshold: float, out_uri: str, model: str, prompt_set: str, fingerprint: str) -> str:
    """MG1..MG5 (and object accuracy for two-object prompts) -> multigen.json URI."""
    prompt_list = load_prompts(prompts, max_prompts)
    detections = storage.read_parquet(detections_uri)
    images = storage.read_parquet(index_uri)[["prompt_id", "image_index"]]
    table = multigen_scores(detections, prompt_list, threshold=threshold, images=images)
    two_object = any(len(set(p.categories)) == 2 for p in prompt_list)
    accuracy = object_accuracy(detections, prompt_list, threshold, images) if two_object else None
    stats_uri = storage.join(posixpath.dirname(index_uri), "stats.json")
    speed = storage.read_json(stats_uri).get("images_per_s") if storage.exists(stats_uri) else None
    uri = storage.join(out_uri, "multigen.json")
    storage.atomic_write_json(uri, multigen_record(model, prompt_set, table, index_uri, speed, accuracy))
    return uri


@stage_task
def score_segmentation(config: dict[str, Any], model_dir: str, unet_dir: str | None, cache_uri: str,
                       out_uri: str, fingerprint: str) -> str:
    """Attention-map mIoU on the held-out mask-cache images -> segmentation.json URI."""
    from tokencompose_core.mask_cache import MaskCache

    settings = PipelineConfig.model_validate(config)
    image_ids = heldout_image_ids(MaskCache(cache_uri).image_ids(), settings.score.heldout_images)
    result = segmentation_miou(settings, model_dir, cache_uri, image_ids, unet_dir=unet_dir,
                               overlays_uri=storage.join(out_uri, "overlays"),
                               max_overlays=settings.score.report_overlays)
    uri = storage.join(out_uri, "segmentation.json")
    storage.atomic_write_json(uri, result)
    return uri


@stage_task
def report(runs: dict[str, list[str]], out_uri: str, fingerprint: str) -> dict[str, str]:
    """The comparison report of every scored run -> {md, html, png_*} URIs."""
    return write_report(runs, out_uri)
