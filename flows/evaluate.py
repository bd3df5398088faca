"""Stage 5 flow: score sample folders (MultiGen, attention mIoU, FID, CLIP score) and report them.

    tokencompose score -p tiny --input runs/tiny/samples/base-coco-<key>
    tokencompose score -p tiny          # every finished folder under <root>/samples

Outputs: ``<root>/scores/<samples name>-<key>`` per samples folder and
``<root>/reports/report-<key>`` for the report, each named after what it was
computed from (see tokencompose_core.scoring); ``<root>/fid/<manifest>-<key>`` for the
FID reference statistics, shared by every run scored against that image set. A
trained run scored beside a base-model run sampled with the same prompts and seeds
gets paired 95% bootstrap intervals for every metric difference.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import recompute_unless
from tasks.evaluate import (
    detect,
    export_samples,
    fid_reference_statistics,
    report,
    score_clip,
    score_fid,
    score_multigen,
    score_segmentation,
)
from tokencompose_core import outputs, scoring, storage
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.image_metrics import REFERENCE_RECORD, named_rejects
from tokencompose_core.reports import comparison_table, load_run_scores
from tokencompose_core.stages import stage_fingerprint


def _reference_statistics(config: PipelineConfig, reference: scoring.FidReference | None) -> str | None:
    """The FID reference set's statistics, computed once per image set and network."""
    if reference is None:
        get_run_logger().warning("no FID reference: set score.fid_reference to a manifest (FID skipped)")
        return None
    stats = recompute_unless(fid_reference_statistics, outputs.keep_if_whole(reference.out_uri))(
        reference.manifest_uri, reference.accepted_uri, reference.out_uri, config, reference.identity)
    outputs.seal(reference.out_uri, config, "fid", reference.identity,
                 {"manifest": reference.manifest_uri, "accepted": reference.accepted_uri,
                  "images": config.score.fid_reference_images})
    record = storage.join(reference.out_uri, REFERENCE_RECORD)
    rejects = storage.read_json(record)["rejects"]
    if rejects:
        get_run_logger().warning(f"FID reference: {len(rejects)} images skipped ({named_rejects(rejects)}); "
                                 f"each is listed in {record} and in fid.json")
    return stats


def _score_folder(config: PipelineConfig, plan: scoring.ScorePlan, cache: scoring.HeldoutCache | None,
                  reference: tuple[scoring.FidReference, str] | None, fingerprint: str) -> None:
    """Detect + MultiGen + CLIP score (+ FID with a reference set, attention mIoU with a
    mask cache) for one samples folder."""
    whole = outputs.keep_if_whole(plan.out_uri)
    detections = recompute_unless(detect, whole)(
        plan.index_uri, plan.samples_identity, plan.sample.prompts, plan.sample.max_prompts, config.score, config.models,
        plan.out_uri, fingerprint)
    recompute_unless(score_multigen, whole)(
        detections, plan.index_uri, plan.sample.prompts, plan.sample.max_prompts, config.score.detection_threshold, plan.out_uri,
        plan.model, fingerprint)
    recompute_unless(score_clip, whole)(plan.index_uri, plan.samples_identity, plan.sample.prompts, config.score,
                                        config.models.seed, plan.out_uri, fingerprint)
    if reference is not None:
        recompute_unless(score_fid, whole)(plan.index_uri, plan.samples_identity, reference[1], reference[0].identity,
                                           config.score, config.models.seed, plan.out_uri, fingerprint)
    for suite in config.score.export:
        recompute_unless(export_samples, whole)(plan.samples_uri, plan.samples_identity, suite,
                                                storage.join(plan.out_uri, suite), fingerprint)
    if cache is not None:
        recompute_unless(score_segmentation, whole)(
            config.score, plan.sample, config.train, config.models, plan.model_dir, plan.unet_dir, plan.model_identity,
            cache.uri, cache.identity, plan.out_uri, fingerprint)
    else:
        get_run_logger().warning("no mask cache for these settings: attention mIoU skipped")
    outputs.seal(plan.out_uri, config, "score", fingerprint,
                 scoring.stage_inputs(plan, cache, reference[0] if reference else None))


@flow(name="score", log_prints=True)
def evaluate_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """``input_uri``: a samples folder (with index.parquet); default every finished samples folder."""
    config = load_config(profile, overrides)
    fingerprint, cache = stage_fingerprint(config, "score"), scoring.heldout_cache(config)
    samples, reference = scoring.samples_to_score(config, input_uri), scoring.fid_reference(config)
    stats = _reference_statistics(config, reference)
    plans = [scoring.plan_scores(config, folder, fingerprint, reference) for folder in samples]
    for plan in plans:
        _score_folder(config, plan, cache, (reference, stats) if reference and stats else None, fingerprint)
    runs, pairs = scoring.runs_by_model(plans), scoring.baseline_pairs(plans)
    out_uri, scores_identity = scoring.report_folder(config, fingerprint, runs)
    uris = recompute_unless(report, outputs.keep_if_whole(out_uri))(
        runs, scores_identity, pairs, config.score.bootstrap_resamples, config.score.bootstrap_seed, out_uri,
        fingerprint)
    outputs.seal(out_uri, config, "score", fingerprint, {"scores": runs, "scores_identity": scores_identity})
    table = comparison_table({name: load_run_scores(folders) for name, folders in runs.items()})
    create_table_artifact(table=table.to_dict(orient="records"), key="tokencompose-scores",
                          description=f"{config.name}: MultiGen MG2-MG5, mIoU, FID, CLIP score, latency per run")
    create_markdown_artifact(markdown=storage.read_bytes(uris["md"]).decode("utf-8"), key="tokencompose-report",
                             description=f"{config.name}: report ({uris['html']})")
    print(f"report: {uris['html']}")
    return {"output_uri": out_uri, "scores": [plan.out_uri for plan in plans], "report": uris, "runs": sorted(runs)}
