"""Prefect tasks of stage 5: detection, MultiGen scores, attention mIoU, FID, CLIP score, the report.

Every score unit is submitted to the flow's task runner, as mask and sample shards are: on a
cluster of one worker per GPU the units of several samples folders (and the FID reference
statistics) run on every GPU at once, each worker loading a scoring model once
(:func:`tokencompose_core.devices.loaded_once`). Each unit reports where it ran and for how long.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture

from tasks.common import bookkeeping_task, recompute_unless, retry_batch_size, stage_task
from tokencompose_core import handoff, storage
from tokencompose_core.config import GroundingLayersConfig, ModelsConfig, PipelineConfig, SampleConfig, ScoreConfig
from tokencompose_core.devices import device_turn, placement, resolve_device
from tokencompose_core.image_metrics import REFERENCE_RECORD, named_rejects
from tokencompose_core.manifest import ImagePaths
from tokencompose_core.reports import comparison_table, load_run_scores, write_report
from tokencompose_core.sampling import load_prompts, prompt_set_name
from tokencompose_core.stages import score as stage
from tokencompose_core.stages.score import FidReference, ScorePlan, ScoreResults, ScoreStagePlan

# ``score.export`` -> the function writing that suite's layout.
EXPORTS = {"geneval": handoff.export_geneval, "t2i_compbench": handoff.export_t2i_compbench}


@stage_task
def detect(index_uri: str, samples_identity: str, prompts: str, max_prompts: int | None, score: ScoreConfig,
           models: ModelsConfig, out_uri: str, fingerprint: str) -> dict[str, Any]:
    """Detections of every sampled image (``score.detector``) -> detections.parquet URI."""
    return run_unit("detect", "cpu" if score.detector == "synthetic" else score.device, lambda: stage.detect(
        index_uri, load_prompts(prompts, max_prompts), models, score, out_uri,
        retry_batch_size(score.detector_batch_size)))


@stage_task
def score_multigen(detections_uri: str, index_uri: str, prompts: str, max_prompts: int | None, threshold: float,
                   out_uri: str, model: str, fingerprint: str) -> dict[str, Any]:
    """MG1..MG5 (two-object accuracy for two-object prompts, VISOR for SR2D) -> multigen.json URI."""
    return run_unit("multigen", "cpu", lambda: stage.score_multigen(
        detections_uri, index_uri, load_prompts(prompts, max_prompts), prompt_set_name(prompts), threshold, out_uri,
        model))


@stage_task
def score_segmentation(score: ScoreConfig, sample: SampleConfig, grounding: GroundingLayersConfig,
                       models: ModelsConfig, model_dir: str, unet_dir: str | None, model_identity: str, cache_uri: str,
                       cache_digest: str, out_uri: str, fingerprint: str) -> dict[str, Any]:
    """Attention-map mIoU on the held-out mask-cache images -> segmentation.json URI."""
    return run_unit("segmentation", score.device, lambda: stage.score_segmentation(
        score, sample, grounding, models, model_dir, unet_dir, cache_uri, out_uri))


@stage_task
def fid_reference_statistics(manifest_uri: str, accepted_uri: str | None, out_uri: str, score: ScoreConfig,
                             seed: int, allow_absolute_image_paths: bool, allowed_roots: list[str],
                             max_image_pixels: int, fingerprint: str) -> dict[str, Any]:
    """Inception statistics of the FID reference set -> reference_stats.safetensors URI.

    ``fingerprint`` is the reference's identity (manifest content, rows, how they are read,
    network), not the score fingerprint: every run and setting scored against one image set
    shares them."""
    reference = FidReference(manifest_uri, fingerprint, out_uri, accepted_uri)
    paths = ImagePaths(allow_absolute_image_paths, tuple(allowed_roots))
    return run_unit("fid_reference", score.device, lambda: stage.reference_statistics(
        reference, score, seed, paths, max_image_pixels))


@stage_task
def score_fid(index_uri: str, samples_identity: str, stats_uri: str, reference_identity: str, score: ScoreConfig,
              seed: int, out_uri: str, fingerprint: str) -> dict[str, Any]:
    """FID of one samples folder against the reference statistics -> fid.json URI."""
    return run_unit("fid", score.device, lambda: stage.score_fid(index_uri, stats_uri, score, seed, out_uri))


@stage_task
def score_clip(index_uri: str, samples_identity: str, prompts: str, score: ScoreConfig, seed: int, out_uri: str,
               fingerprint: str) -> dict[str, Any]:
    """CLIP score of one samples folder -> clip.json URI (+ per-prompt values)."""
    return run_unit("clip", score.device, lambda: stage.score_clip(
        index_uri, score, seed, prompt_set_name(prompts), out_uri))


@stage_task
def export_samples(samples_uri: str, samples_identity: str, suite: str, out_uri: str,
                   fingerprint: str) -> dict[str, Any]:
    """A samples folder in GenEval's or T2I-CompBench's layout under ``out_uri``."""
    return run_unit(f"export {suite}", "cpu", lambda: EXPORTS[suite](samples_uri, out_uri))


def run_unit(step: str, device: str, work: Callable[[], str]) -> dict[str, Any]:
    """Run one score unit, ``work``, in its turn on this process's device (units of one
    process take turns, :func:`tokencompose_core.devices.device_turn`); its result, made
    where it ran: what it wrote, where (the device ``device`` resolves to there and the GPUs
    this process sees) and its seconds."""
    with device_turn():
        started = time.perf_counter()
        uri = work()
        return {"step": step, "uri": uri, "seconds": round(time.perf_counter() - started, 3),
                **placement(resolve_device(device))}


@stage_task
def report(runs: dict[str, list[str]], scores_digest: str, pairs: dict[str, tuple[str, str]], resamples: int,
           seed: int, out_uri: str, fingerprint: str) -> dict[str, str]:
    """The comparison report of the scored runs (with paired intervals) -> {md, html, png_*} URIs."""
    return write_report(runs, out_uri, pairs=pairs or None, resamples=resamples, seed=seed)


seal_scores = bookkeeping_task(stage.seal_scores)
seal_reference = bookkeeping_task(stage.seal_reference)
plan_report = bookkeeping_task(stage.plan_report)


def run_units(config: PipelineConfig, plan: ScoreStagePlan) -> ScoreResults:
    """The FID reference statistics (once per image set) and every folder's units on the task
    runner, each folder sealed once its units are done; then the report."""
    reference = _submit_reference(config, plan)
    if plan.cache is None and config.score.heldout_images:
        get_run_logger().warning("no mask cache for these settings: attention mIoU skipped")
    # Units that need no other unit first, for every folder: they spread over the workers.
    first = {folder.out_uri: _submit_independent(config, plan, folder) for folder in plan.folders}
    stats = _sealed_reference(config, plan, reference)
    units = [] if reference is None else [{**stats, "folder": plan.reference.out_uri}]
    then = {folder.out_uri: _submit_dependent(config, plan, folder, first[folder.out_uri][0].result()["uri"], stats)
            for folder in plan.folders}
    for folder in plan.folders:
        units += [{**future.result(), "folder": folder.out_uri}
                  for future in [*first[folder.out_uri], *then[folder.out_uri]]]
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
    return ScoreResults(report_plan, uris, units)


def _submit_reference(config: PipelineConfig, plan: ScoreStagePlan) -> PrefectFuture | None:
    """The FID reference set's statistics, computed once per image set and network."""
    reference = plan.reference
    if reference is None:
        if config.score.fid:
            get_run_logger().warning("no FID reference: set score.fid_reference to a manifest (FID skipped)")
        return None
    return recompute_unless(fid_reference_statistics, plan.whole[reference.out_uri]).submit(
        reference.manifest_uri, reference.accepted_uri, reference.out_uri, config.score, config.models.seed,
        config.nouns.allow_absolute_image_paths, config.storage.allowed_roots, config.masks.max_image_pixels,
        reference.identity)


def _sealed_reference(config: PipelineConfig, plan: ScoreStagePlan,
                      submitted: PrefectFuture | None) -> dict[str, Any] | None:
    """The reference statistics' unit once done, their folder sealed and its skipped images named."""
    if submitted is None:
        return None
    stats = submitted.result()
    seal_reference(config, plan.reference)
    record = storage.join(plan.reference.out_uri, REFERENCE_RECORD)
    rejects = storage.read_json(record)["rejects"]
    if rejects:
        get_run_logger().warning(f"FID reference: {len(rejects)} images skipped ({named_rejects(rejects)}); "
                                 f"each is listed in {record} and in fid.json")
    return stats


def _submit_independent(config: PipelineConfig, plan: ScoreStagePlan, folder: ScorePlan) -> list[PrefectFuture]:
    """Detection first (MultiGen waits for it), then CLIP score (when ``score.clip``), the
    exports and attention mIoU (with a mask cache) of one samples folder."""
    whole, fingerprint, score = plan.whole[folder.out_uri], plan.fingerprint, config.score
    futures = [recompute_unless(detect, whole).submit(
        folder.index_uri, folder.samples_identity, folder.sample.prompts, folder.sample.max_prompts, score,
        config.models, folder.out_uri, fingerprint)]
    if score.clip:
        futures.append(recompute_unless(score_clip, whole).submit(
            folder.index_uri, folder.samples_identity, folder.sample.prompts, score, config.models.seed,
            folder.out_uri, fingerprint))
    futures += [recompute_unless(export_samples, whole).submit(
                    folder.samples_uri, folder.samples_identity, suite, storage.join(folder.out_uri, suite),
                    fingerprint)
                for suite in score.export]
    if plan.cache is not None:
        futures.append(recompute_unless(score_segmentation, whole).submit(
            score, folder.sample, config.train.grounding, config.models, folder.model_dir, folder.unet_dir,
            folder.model_identity, plan.cache.uri, plan.cache.identity, folder.out_uri, fingerprint))
    return futures


def _submit_dependent(config: PipelineConfig, plan: ScoreStagePlan, folder: ScorePlan, detections_uri: str,
                      stats: dict[str, Any] | None) -> list[PrefectFuture]:
    """MultiGen of one folder's detections, and its FID once the reference statistics exist."""
    whole, fingerprint, score = plan.whole[folder.out_uri], plan.fingerprint, config.score
    futures = [recompute_unless(score_multigen, whole).submit(
        detections_uri, folder.index_uri, folder.sample.prompts, folder.sample.max_prompts,
        score.detection_threshold, folder.out_uri, folder.model, fingerprint)]
    if stats is not None:
        futures.append(recompute_unless(score_fid, whole).submit(
            folder.index_uri, folder.samples_identity, stats["uri"], plan.reference.identity, score,
            config.models.seed, folder.out_uri, fingerprint))
    return futures
