"""Prefect tasks of stage 5: detection, MultiGen scores, attention mIoU, FID, CLIP score, the report."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import bookkeeping_task, recompute_unless, retry_batch_size, stage_task
from tokencompose_core import handoff, storage
from tokencompose_core.config import GroundingLayersConfig, ModelsConfig, PipelineConfig, SampleConfig, ScoreConfig
from tokencompose_core.image_metrics import REFERENCE_RECORD, named_rejects
from tokencompose_core.manifest import ImagePaths
from tokencompose_core.reports import comparison_table, load_run_scores, write_report
from tokencompose_core.sampling import load_prompts, prompt_set_name
from tokencompose_core.stages import score as stage
from tokencompose_core.stages.score import FidReference, ReportPlan, ScorePlan, ScoreStagePlan

# ``score.export`` -> the function writing that suite's layout.
EXPORTS = {"geneval": handoff.export_geneval, "t2i_compbench": handoff.export_t2i_compbench}


@stage_task
def detect(index_uri: str, samples_identity: str, prompts: str, max_prompts: int | None, score: ScoreConfig,
           models: ModelsConfig, out_uri: str, fingerprint: str) -> str:
    """Detections of every sampled image (``score.detector``) -> detections.parquet URI."""
    return stage.detect(index_uri, load_prompts(prompts, max_prompts), models, score, out_uri,
                        retry_batch_size(score.detector_batch_size))


@stage_task
def score_multigen(detections_uri: str, index_uri: str, prompts: str, max_prompts: int | None, threshold: float,
                   out_uri: str, model: str, fingerprint: str) -> str:
    """MG1..MG5 (two-object accuracy for two-object prompts, VISOR for SR2D) -> multigen.json URI."""
    return stage.score_multigen(detections_uri, index_uri, load_prompts(prompts, max_prompts),
                                prompt_set_name(prompts), threshold, out_uri, model)


@stage_task
def score_segmentation(score: ScoreConfig, sample: SampleConfig, grounding: GroundingLayersConfig,
                       models: ModelsConfig, model_dir: str, unet_dir: str | None, model_identity: str, cache_uri: str,
                       cache_digest: str, out_uri: str, fingerprint: str) -> str:
    """Attention-map mIoU on the held-out mask-cache images -> segmentation.json URI."""
    return stage.score_segmentation(score, sample, grounding, models, model_dir, unet_dir, cache_uri, out_uri)


@stage_task
def fid_reference_statistics(manifest_uri: str, accepted_uri: str | None, out_uri: str, score: ScoreConfig,
                             seed: int, allow_absolute_image_paths: bool, allowed_roots: list[str],
                             max_image_pixels: int, fingerprint: str) -> str:
    """Inception statistics of the FID reference set -> reference_stats.safetensors URI.

    ``fingerprint`` is the reference's identity (manifest content, rows, how they are read,
    network), not the score fingerprint: every run and setting scored against one image set
    shares them."""
    reference = FidReference(manifest_uri, fingerprint, out_uri, accepted_uri)
    paths = ImagePaths(allow_absolute_image_paths, tuple(allowed_roots))
    return stage.reference_statistics(reference, score, seed, paths, max_image_pixels)


@stage_task
def score_fid(index_uri: str, samples_identity: str, stats_uri: str, reference_identity: str, score: ScoreConfig,
              seed: int, out_uri: str, fingerprint: str) -> str:
    """FID of one samples folder against the reference statistics -> fid.json URI."""
    return stage.score_fid(index_uri, stats_uri, score, seed, out_uri)


@stage_task
def score_clip(index_uri: str, samples_identity: str, prompts: str, score: ScoreConfig, seed: int, out_uri: str,
               fingerprint: str) -> str:
    """CLIP score of one samples folder -> clip.json URI (+ per-prompt values)."""
    return stage.score_clip(index_uri, score, seed, prompt_set_name(prompts), out_uri)


@stage_task
def export_samples(samples_uri: str, samples_identity: str, suite: str, out_uri: str, fingerprint: str) -> str:
    """A samples folder in GenEval's or T2I-CompBench's layout under ``out_uri``."""
    return EXPORTS[suite](samples_uri, out_uri)


@stage_task
def report(runs: dict[str, list[str]], scores_digest: str, pairs: dict[str, tuple[str, str]], resamples: int,
           seed: int, out_uri: str, fingerprint: str) -> dict[str, str]:
    """The comparison report of the scored runs (with paired intervals) -> {md, html, png_*} URIs."""
    return write_report(runs, out_uri, pairs=pairs or None, resamples=resamples, seed=seed)


seal_scores = bookkeeping_task(stage.seal_scores)
seal_reference = bookkeeping_task(stage.seal_reference)
plan_report = bookkeeping_task(stage.plan_report)


def run_units(config: PipelineConfig, plan: ScoreStagePlan) -> tuple[ReportPlan, dict[str, str]]:
    """The FID reference statistics (once per image set), every folder's scores, then the report."""
    stats = _reference_statistics(config, plan)
    if plan.cache is None and config.score.heldout_images:
        get_run_logger().warning("no mask cache for these settings: attention mIoU skipped")
    for folder in plan.folders:
        _score_folder(config, plan, folder, stats)
        seal_scores(config, plan, folder)
    report_plan = plan_report(config, plan)
    uris = recompute_unless(report, report_plan.whole)(
        report_plan.runs, report_plan.scores_identity, report_plan.pairs, config.score.bootstrap_resamples,
        config.score.bootstrap_seed, report_plan.out_uri, plan.fingerprint)
    table = comparison_table({name: load_run_scores(folders) for name, folders in report_plan.runs.items()})
    create_table_artifact(table=table.to_dict(orient="records"), key="tokencompose-scores",
                          description=f"{config.name}: MultiGen MG2-MG5, mIoU, FID, CLIP score, latency per run")
    create_markdown_artifact(markdown=storage.read_bytes(uris["md"]).decode("utf-8"), key="tokencompose-report",
                             description=f"{config.name}: report ({uris['html']})")
    return report_plan, uris


def _reference_statistics(config: PipelineConfig, plan: ScoreStagePlan) -> str | None:
    """The FID reference set's statistics, computed once per image set and network."""
    reference = plan.reference
    if reference is None:
        if config.score.fid:
            get_run_logger().warning("no FID reference: set score.fid_reference to a manifest (FID skipped)")
        return None
    stats = recompute_unless(fid_reference_statistics, plan.whole[reference.out_uri])(
        reference.manifest_uri, reference.accepted_uri, reference.out_uri, config.score, config.models.seed,
        config.nouns.allow_absolute_image_paths, config.storage.allowed_roots, config.masks.max_image_pixels,
        reference.identity)
    seal_reference(config, reference)
    record = storage.join(reference.out_uri, REFERENCE_RECORD)
    rejects = storage.read_json(record)["rejects"]
    if rejects:
        get_run_logger().warning(f"FID reference: {len(rejects)} images skipped ({named_rejects(rejects)}); "
                                 f"each is listed in {record} and in fid.json")
    return stats


def _score_folder(config: PipelineConfig, plan: ScoreStagePlan, folder: ScorePlan, stats: str | None) -> None:
    """Detect + MultiGen (+ CLIP score when ``score.clip``, FID with a reference set, attention
    mIoU with a mask cache) for one samples folder."""
    whole, fingerprint, score = plan.whole[folder.out_uri], plan.fingerprint, config.score
    detections = recompute_unless(detect, whole)(
        folder.index_uri, folder.samples_identity, folder.sample.prompts, folder.sample.max_prompts, score,
        config.models, folder.out_uri, fingerprint)
    recompute_unless(score_multigen, whole)(
        detections, folder.index_uri, folder.sample.prompts, folder.sample.max_prompts, score.detection_threshold,
        folder.out_uri, folder.model, fingerprint)
    if score.clip:
        recompute_unless(score_clip, whole)(folder.index_uri, folder.samples_identity, folder.sample.prompts, score,
                                            config.models.seed, folder.out_uri, fingerprint)
    if stats is not None:
        recompute_unless(score_fid, whole)(folder.index_uri, folder.samples_identity, stats, plan.reference.identity,
                                           score, config.models.seed, folder.out_uri, fingerprint)
    for suite in score.export:
        recompute_unless(export_samples, whole)(folder.samples_uri, folder.samples_identity, suite,
                                                storage.join(folder.out_uri, suite), fingerprint)
    if plan.cache is not None:
        recompute_unless(score_segmentation, whole)(
            score, folder.sample, config.train.grounding, config.models, folder.model_dir, folder.unet_dir,
            folder.model_identity, plan.cache.uri, plan.cache.identity, folder.out_uri, fingerprint)
