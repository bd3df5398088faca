"""Prefect tasks of stage 5: detection, MultiGen scores, attention mIoU, FID, CLIP score, the report."""

from __future__ import annotations

from tasks.common import retry_batch_size, stage_task
from tokencompose_core import handoff, scoring
from tokencompose_core.config import ModelsConfig, PipelineConfig, SampleConfig, ScoreConfig, TrainConfig
from tokencompose_core.reports import write_report
from tokencompose_core.sampling import load_prompts, prompt_set_name

# ``score.export`` -> the function writing that suite's layout.
EXPORTS = {"geneval": handoff.export_geneval, "t2i_compbench": handoff.export_t2i_compbench}


@stage_task
def detect(index_uri: str, samples_identity: str, prompts: str, max_prompts: int | None, score: ScoreConfig,
           models: ModelsConfig, out_uri: str, fingerprint: str) -> str:
    """Detections of every sampled image (``score.detector``) -> detections.parquet URI."""
    return scoring.detect(index_uri, load_prompts(prompts, max_prompts), models, score, out_uri,
                          retry_batch_size(score.detector_batch_size))


@stage_task
def score_multigen(detections_uri: str, index_uri: str, prompts: str, max_prompts: int | None, threshold: float,
                   out_uri: str, model: str, fingerprint: str) -> str:
    """MG1..MG5 (and two-object accuracy for two-object prompts) -> multigen.json URI."""
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
def fid_reference_statistics(manifest_uri: str, accepted_uri: str | None, out_uri: str, config: PipelineConfig,
                             fingerprint: str) -> str:
    """Inception statistics of the FID reference set -> reference_stats.safetensors URI.

    ``fingerprint`` is the reference's identity (manifest content, rows, how they are read,
    network), not the score fingerprint: every run and setting scored against one image set
    shares them."""
    reference = scoring.FidReference(manifest_uri, fingerprint, out_uri, accepted_uri)
    return scoring.reference_statistics(reference, config)


@stage_task
def score_fid(index_uri: str, samples_identity: str, stats_uri: str, reference_identity: str, score: ScoreConfig,
              seed: int, out_uri: str, fingerprint: str) -> str:
    """FID of one samples folder against the reference statistics -> fid.json URI."""
    return scoring.score_fid(index_uri, stats_uri, score, seed, out_uri)


@stage_task
def score_clip(index_uri: str, samples_identity: str, prompts: str, score: ScoreConfig, seed: int, out_uri: str,
               fingerprint: str) -> str:
    """CLIP score of one samples folder -> clip.json URI (+ per-prompt values)."""
    return scoring.score_clip(index_uri, score, seed, prompt_set_name(prompts), out_uri)


@stage_task
def export_samples(samples_uri: str, samples_identity: str, suite: str, out_uri: str, fingerprint: str) -> str:
    """A samples folder in GenEval's or T2I-CompBench's layout under ``out_uri``."""
    return EXPORTS[suite](samples_uri, out_uri)


@stage_task
def report(runs: dict[str, list[str]], scores_digest: str, pairs: dict[str, tuple[str, str]], resamples: int,
           seed: int, out_uri: str, fingerprint: str) -> dict[str, str]:
    """The comparison report of the scored runs (with paired intervals) -> {md, html, png_*} URIs."""
    return write_report(runs, out_uri, pairs=pairs or None, resamples=resamples, seed=seed)
