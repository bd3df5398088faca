"""Prefect tasks of stage 5: detection, MultiGen scores, attention mIoU, the report."""

from __future__ import annotations

from tasks.common import retry_batch_size, stage_task
from tokencompose_core import scoring
from tokencompose_core.config import ModelsConfig, PipelineConfig, SampleConfig, ScoreConfig, TrainConfig
from tokencompose_core.reports import write_report
from tokencompose_core.sampling import load_prompts, prompt_set_name


@stage_task
def detect(index_uri: str, samples_identity: str, prompts: str, max_prompts: int | None, score: ScoreConfig,
           models: ModelsConfig, out_uri: str, fingerprint: str) -> str:
    """Detections of every sampled image (``score.detector``) -> detections.parquet URI."""
    return scoring.detect(index_uri, load_prompts(prompts, max_prompts), models, score, out_uri,
                          retry_batch_size(score.detector_batch_size))


@stage_task
def score_multigen(detections_uri: str, index_uri: str, prompts: str, max_prompts: int | None, threshold: float,
                   out_uri: str, model: str, fingerprint: str) -> str:
    """MG1..MG5 (and object accuracy for two-object prompts) -> multigen.json URI."""
    return scoring.score_multigen(detections_uri, index_uri, load_prompts(prompts, max_prompts),
                                  prompt_set_name(prompts), threshold, out_uri, model)


@stage_task
def score_segmentation(score: ScoreConfig, sample: SampleConfig, train: TrainConfig, models: ModelsConfig,
                       model_dir: str, unet_dir: str | None, model_identity: str, cache_uri: str, cache_digest: str,
                       out_uri: str, fingerprint: str) -> str:
    """Attention-map mIoU on the held-out mask-cache images -> segmentation.json URI."""
    settings = PipelineConfig(models=models, train=train, sample=sample, score=score)
    return scoring.score_segmentation(settings, model_dir, unet_dir, cache_uri, out_uri)


@stage_task
def report(runs: dict[str, list[str]], scores_digest: str, out_uri: str, fingerprint: str) -> dict[str, str]:
    """The comparison report of the scored runs -> {md, html, png_*} URIs."""
    return write_report(runs, out_uri)
