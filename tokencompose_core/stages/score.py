"""Stage 5, score: MultiGen, attention mIoU, FID and CLIP score of samples folders, and their report.

Outputs: ``<root>/scores/<samples name>-<key>/`` per samples folder, named after
the samples' content and the score stage's fingerprint; ``<root>/fid/<manifest>-<key>/``
for the FID reference statistics, shared by every run scored against that image
set; ``<root>/reports/report-<key>/`` named after the scores it reports. Units per
samples folder: detect, MultiGen, CLIP score, FID, exports, attention mIoU; then
one report. A trained run scored beside a base-model run sampled with the same
prompts and seeds gets paired 95% bootstrap intervals for every metric difference.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from tokencompose_core import image_metrics, outputs, storage, visor
from tokencompose_core.config import GroundingLayersConfig, ModelsConfig, PipelineConfig, SampleConfig, ScoreConfig
from tokencompose_core.devices import loaded_once, resolve_device
from tokencompose_core.evaluation import (
    detect_owlv2,
    detect_owlvit,
    multigen_per_prompt,
    multigen_scores,
    read_image,
    segmentation_miou,
    two_object_accuracy,
)
from tokencompose_core.identity import uri_identity, value_hash
from tokencompose_core.intervals import PER_UNIT_COLUMNS
from tokencompose_core.manifest import ImagePaths
from tokencompose_core.mask_cache import COMPLETED, MaskCache, heldout_image_ids
from tokencompose_core.reports import MG_KS, multigen_record
from tokencompose_core.sampling import Prompt, model_fingerprint
from tokencompose_core.stages import stage_fingerprint
from tokencompose_core.stages.masks import current_cache
from tokencompose_core.stages.sample import model_name, samples_folder
from tokencompose_core.threads import pinned_threads


@dataclass(frozen=True)
class ScorePlan:
    """One samples folder to score, and where its scores go."""

    samples_uri: str
    index_uri: str
    samples_identity: str  # content identity of the samples folder
    sample: SampleConfig  # the settings the samples were made with
    model: str  # "base" or the trained run's folder name
    model_dir: str
    unet_dir: str | None
    model_identity: str
    out_uri: str


@dataclass(frozen=True)
class ScoreStagePlan:
    """Every samples folder to score with one score fingerprint, and what they are scored against."""

    fingerprint: str
    folders: list[ScorePlan]
    whole: dict[str, bool]  # per output folder (scores, FID reference): matches its record
    cache: HeldoutCache | None  # attention mIoU's mask cache
    reference: FidReference | None


def plan(config: PipelineConfig, input_uri: str | None) -> ScoreStagePlan:
    """``input_uri``: a samples folder (with index.parquet); default every finished samples folder."""
    fingerprint, cache = stage_fingerprint(config, "score"), heldout_cache(config)
    reference = fid_reference(config)
    folders = [plan_scores(config, folder, fingerprint, reference) for folder in samples_to_score(config, input_uri)]
    whole = {folder.out_uri: outputs.keep_if_whole(folder.out_uri) for folder in folders}
    if reference is not None:
        whole[reference.out_uri] = outputs.keep_if_whole(reference.out_uri)
    return ScoreStagePlan(fingerprint, folders, whole, cache, reference)


@dataclass(frozen=True)
class ReportPlan:
    out_uri: str
    scores_identity: str  # the content of the scores folders it reports
    runs: dict[str, list[str]]  # model -> its scores folders
    pairs: dict[str, tuple[str, str]]  # label -> (base, trained run) compared with paired intervals
    whole: bool

    @property
    def inputs(self) -> dict[str, Any]:
        return {"scores": self.runs, "scores_identity": self.scores_identity}


def plan_report(config: PipelineConfig, stage_plan: ScoreStagePlan) -> ReportPlan:
    """The report of the sealed scores folders: named after their content."""
    runs = runs_by_model(stage_plan.folders)
    scores = {model: [uri_identity(uri) for uri in folders] for model, folders in runs.items()}
    identity = value_hash(scores)
    out_uri = outputs.output_folder(config, "reports", "report", [stage_plan.fingerprint, identity])
    return ReportPlan(out_uri, identity, runs, baseline_pairs(stage_plan.folders), outputs.keep_if_whole(out_uri))


def seal_scores(config: PipelineConfig, plan: ScoreStagePlan, folder: ScorePlan) -> None:
    outputs.seal(folder.out_uri, config, "score", plan.fingerprint, stage_inputs(folder, plan.cache, plan.reference))


def seal_reference(config: PipelineConfig, reference: FidReference) -> None:
    outputs.seal(reference.out_uri, config, "fid", reference.identity,
                 {"manifest": reference.manifest_uri, "accepted": reference.accepted_uri,
                  "images": config.score.fid_reference_images})


@dataclass(frozen=True)
class ScoreResults:
    """What the units of a score stage run made: the report, and every unit's run."""

    report: ReportPlan
    uris: dict[str, str]  # the report's files: md, html, png_*
    # Per unit: step, the folder it wrote in, its output URI, seconds, device and the GPUs its process saw.
    units: list[dict[str, Any]]


def seal(config: PipelineConfig, plan: ScoreStagePlan, results: ScoreResults) -> None:
    """The report's record (each scores folder was sealed before the report was planned)."""
    outputs.seal(results.report.out_uri, config, "score", plan.fingerprint, results.report.inputs)


def summary(plan: ScoreStagePlan, results: ScoreResults) -> dict[str, Any]:
    return {"output_uri": results.report.out_uri, "scores": [folder.out_uri for folder in plan.folders],
            "report": results.uris, "runs": sorted(results.report.runs),
            "unit_runs": [{key: unit[key] for key in ("step", "folder", "seconds", "device", "visible_gpus")}
                          for unit in results.units]}


@dataclass(frozen=True)
class FidReference:
    """The reference image set FID is measured against, and where its statistics are kept."""

    manifest_uri: str
    identity: str  # the manifest's content, the rows used, how they are read and the Inception network
    out_uri: str
    # Stage 1's nouns table when the set is the manifest stage 1 read: only its rows are read.
    accepted_uri: str | None = None


@dataclass(frozen=True)
class HeldoutCache:
    """The mask cache whose held-out images attention mIoU is measured on."""

    uri: str
    identity: str


def base_samples(config: PipelineConfig) -> str | None:
    """The base model's finished samples folder made with these sample settings, if any:
    the baseline a trained run's samples are paired with (same prompts and seeds)."""
    from tokencompose_core.models import resolve_diffusion_dir

    folder = samples_folder(config, None, model_fingerprint(resolve_diffusion_dir(config.models)),
                            stage_fingerprint(config, "sample"))
    return folder if outputs.is_whole(folder) else None


def samples_to_score(config: PipelineConfig, input_uri: str | None) -> list[str]:
    """The samples folder given (with the base model's samples of the same settings beside
    it, when there are), or every finished samples folder under <root>/samples."""
    if input_uri:
        storage.check_input(input_uri, config.storage)
        if not storage.exists(storage.join(input_uri, "index.parquet")):
            raise FileNotFoundError(f"{input_uri} is not a samples folder (no index.parquet)")
        baseline = base_samples(config)
        return [input_uri.rstrip("/")] + ([baseline] if baseline and baseline != input_uri.rstrip("/") else [])
    found = [uri for _, uri in outputs.finished(config, "samples")]
    if not found:
        raise FileNotFoundError(f"no finished samples folders under {storage.join(config.storage.root, 'samples')}; "
                                "run `tokencompose sample` first")
    return found


def plan_scores(config: PipelineConfig, samples_uri: str, fingerprint: str,
                reference: FidReference | None = None) -> ScorePlan:
    """Where the scores of ``samples_uri`` go for this score fingerprint (and FID reference set)."""
    meta = storage.read_json(storage.join(samples_uri, "sample_meta.json"))
    identity = uri_identity(samples_uri)
    name = posixpath.basename(samples_uri.rstrip("/"))
    return ScorePlan(
        samples_uri=samples_uri,
        index_uri=storage.join(samples_uri, "index.parquet"),
        samples_identity=identity,
        sample=SampleConfig.model_validate(meta["sample"]),
        model=model_name(meta["unet_dir"]),
        model_dir=meta["model_dir"],
        unet_dir=meta["unet_dir"],
        model_identity=meta["model_fingerprint"],
        out_uri=outputs.output_folder(config, "scores", name.rsplit("-", 1)[0],
                                      [fingerprint, identity] + ([reference.identity] if reference else [])),
    )


def heldout_cache(config: PipelineConfig) -> HeldoutCache | None:
    """The mask cache for attention mIoU: ``score.mask_cache``, else the one training reads by
    default (these settings' cache, else the newest import of the authors' data); None when
    mIoU is off or there is none."""
    if not config.score.heldout_images:
        return None
    if config.score.mask_cache:
        uri = storage.check_input(config.score.mask_cache, config.storage)
    else:
        try:
            uri = current_cache(config)
        except FileNotFoundError:
            return None
    if not storage.exists(storage.join(uri, COMPLETED)):
        return None
    return HeldoutCache(uri, uri_identity(uri))


def fid_reference(config: PipelineConfig) -> FidReference | None:
    """The FID reference set: ``score.fid_reference``, else the manifest stage 1 read for
    these settings, limited to the rows stage 1 accepted (so the tiny profile measures FID
    against its input's images); None when FID is off or no manifest is known."""
    from tokencompose_core.models.scorers import scorer_identity

    if not config.score.fid:
        return None
    manifest, accepted = config.score.fid_reference, None
    if manifest:
        storage.check_input(manifest, config.storage)
    else:
        found = outputs.discover(config, "nouns", stage_fingerprint(config, "nouns"))
        manifest = (outputs.read_record(found[0]) or {}).get("inputs", {}).get("manifest") if found else None
        if not manifest:
            return None
        accepted = storage.join(found[0], "nouns.parquet")
    identity = value_hash({"manifest": uri_identity(manifest), "accepted": uri_identity(accepted) if accepted else None,
                           "images": config.score.fid_reference_images,
                           "inception": scorer_identity(config.score.inception_weights), "seed": config.models.seed,
                           "features": config.score.fid_features, "max_pixels": config.masks.max_image_pixels,
                           "paths": asdict(image_paths(config))})
    out_uri = outputs.output_folder(config, "fid", image_metrics.reference_name(manifest), identity)
    return FidReference(manifest, identity, out_uri, accepted)


def image_paths(config: PipelineConfig) -> ImagePaths:
    """The image paths a manifest may use under these settings (stage 1's rules)."""
    return ImagePaths.from_config(config.nouns, config.storage.allowed_roots)


def reference_statistics(reference: FidReference, score: ScoreConfig, seed: int, paths: ImagePaths,
                         max_image_pixels: int) -> str:
    """The reference set's Inception statistics -> reference_stats.safetensors URI; its images are
    read as stages 1-2 read them (``paths``, ``max_image_pixels``), and those that cannot be are skipped."""
    inception = loaded_once(_inception, score.inception_weights, seed, score.fid_features)
    return image_metrics.reference_statistics(reference.manifest_uri, score.fid_reference_images, inception,
                                              reference.out_uri, score.metrics_batch_size, reference.accepted_uri,
                                              paths, max_image_pixels, resolve_device(score.device))


def _inception(weights: str, seed: int, features: int) -> Any:
    from tokencompose_core.models.scorers import load_inception

    return load_inception(weights, seed, features)


def score_fid(index_uri: str, stats_uri: str, score: ScoreConfig, seed: int, out_uri: str) -> str:
    """FID of one samples folder against the reference statistics -> fid.json URI."""
    inception = loaded_once(_inception, score.inception_weights, seed, score.fid_features)
    return image_metrics.fid_score(index_uri, stats_uri, inception, out_uri, score.metrics_batch_size,
                                   resolve_device(score.device))


def score_clip(index_uri: str, score: ScoreConfig, seed: int, prompt_set: str, out_uri: str) -> str:
    """CLIP score of one samples folder -> clip.json URI (+ per-prompt values for intervals)."""
    from tokencompose_core.models.scorers import load_clip

    device = resolve_device(score.device)
    model, processor = loaded_once(load_clip, score.clip_model, seed)
    per_image = image_metrics.clip_scores(index_uri, model.to(device), processor, score.metrics_batch_size, device)
    per_prompt = per_image.groupby("prompt_id")["clip_score"].mean()
    write_per_unit(pd.DataFrame({"unit": [f"prompt {i}" for i in per_prompt.index], "metric": "CLIP score",
                                 "value": per_prompt.to_numpy(dtype=float)}), out_uri, "clip")
    uri = storage.join(out_uri, "clip.json")
    storage.atomic_write_json(uri, {**image_metrics.clip_record(per_image, score.clip_model), "prompt_set": prompt_set})
    return uri


def write_per_unit(table: pd.DataFrame, out_uri: str, name: str) -> str:
    """Per-prompt (or per-noun) values of one scorer: what paired intervals resample."""
    uri = storage.join(out_uri, f"per_unit_{name}.parquet")
    storage.atomic_write_parquet(table[PER_UNIT_COLUMNS], uri)
    return uri


def _detect_owlv2(index_uri: str, prompts: list[Prompt], models: ModelsConfig, score: ScoreConfig, out_uri: str,
                  batch_size: int) -> str:
    return detect_owlv2(index_uri, prompts, models, out_uri, store_threshold=score.store_threshold,
                        batch_size=batch_size, device=score.device, backend=score.owlv2_backend)


def _detect_owlvit(index_uri: str, prompts: list[Prompt], models: ModelsConfig, score: ScoreConfig, out_uri: str,
                   batch_size: int) -> str:
    return detect_owlvit(index_uri, prompts, models, out_uri, store_threshold=score.store_threshold,
                         batch_size=batch_size, device=score.device)


def _detect_synthetic(index_uri: str, prompts: list[Prompt], models: ModelsConfig, score: ScoreConfig,
                      out_uri: str, batch_size: int) -> str:
    from tokencompose_core import synthetic

    index = storage.read_parquet(index_uri)
    images = ((row.prompt_id, row.image_index, np.asarray(read_image(row.image_uri)))
              for row in index.itertuples(index=False))
    frame = synthetic.detections_frame(images, score.synthetic_detector, score.store_threshold)
    uri = storage.join(out_uri, "detections.parquet")
    storage.atomic_write_parquet(frame, uri)
    return uri


# ``score.detector`` -> the function writing ``detections.parquet`` (one schema for all).
DETECTORS: dict[str, Callable[..., str]] = {"owlv2": _detect_owlv2, "owlvit": _detect_owlvit,
                                            "synthetic": _detect_synthetic}


def detect(index_uri: str, prompts: list[Prompt], models: ModelsConfig, score: ScoreConfig, out_uri: str,
           batch_size: int) -> str:
    """Detections of every sampled image by ``score.detector`` -> detections.parquet URI."""
    return DETECTORS[score.detector](index_uri, prompts, models, score, out_uri, batch_size)


def reported_ks(prompts: list[Prompt]) -> list[int]:
    """MG_k worth reporting for a set of prompts: above its largest prompt, MG_k is 0 by construction."""
    return [k for k in MG_KS if k <= max(len(p.categories) for p in prompts)]


def multigen_by_group(detections: pd.DataFrame, index: pd.DataFrame, prompts: list[Prompt],
                      groups: dict[str, list[int]], threshold: float) -> dict[str, dict[str, dict[str, float]]]:
    """MG1..MG5 (mean/std over image indices) for each named group of prompt ids."""
    out = {}
    for group, ids in groups.items():
        chosen = set(ids)
        table = multigen_scores(detections[detections["prompt_id"].isin(chosen)],
                                [p for p in prompts if p.prompt_id in chosen], threshold,
                                images=index[index["prompt_id"].isin(chosen)])
        out[group] = table.to_dict(orient="index")
    return out


def score_multigen(detections_uri: str, index_uri: str, prompts: list[Prompt], prompt_set: str, threshold: float,
                   out_uri: str, model: str) -> str:
    """MG1..MG5 (and two-object accuracy for two-object prompts) -> multigen.json URI; for
    VISOR's spatial prompts (visor:sr2d), VISOR's metrics -> visor.json beside it.

    The prompts' groups (:func:`prompt_groups`), when they name some, are scored apart as
    well, each with the MG_k worth reporting for it.
    """
    groups = prompt_groups(prompts)
    detections = storage.read_parquet(detections_uri)
    index = storage.read_parquet(index_uri)
    images = index[["prompt_id", "image_index"]]
    table = multigen_scores(detections, prompts, threshold=threshold, images=images)
    two_object = any(len(set(p.categories)) == 2 for p in prompts)
    accuracy = two_object_accuracy(detections, prompts, threshold, images) if two_object else None
    by_id = {p.prompt_id: p for p in prompts}
    # Per-prompt values under the names of the report's tables (the groups', when scored by group).
    named = groups or {prompt_set: sorted(by_id)}
    write_per_unit(pd.concat([multigen_per_prompt(detections, [by_id[i] for i in ids], threshold,
                                                  images[images["prompt_id"].isin(set(ids))], name)
                              for name, ids in named.items()], ignore_index=True), out_uri, "multigen")
    record = multigen_record(model, prompt_set, table, index_uri, accuracy)
    record["reported_ks"] = {prompt_set: reported_ks(prompts)}
    if groups:
        record["groups"] = multigen_by_group(detections, images, prompts, groups, threshold)
        record["reported_ks"] = {group: reported_ks([by_id[i] for i in ids]) for group, ids in groups.items()}
    if visor.is_visor_set(prompts):  # before multigen.json, whose presence marks this step done
        visor.score_visor(detections, images, prompts, prompt_set, threshold, out_uri)
    uri = storage.join(out_uri, "multigen.json")
    storage.atomic_write_json(uri, record)
    return uri


def prompt_groups(prompts: list[Prompt]) -> dict[str, list[int]]:
    """Prompt ids per group the prompts name (the demo's "3 objects", "unseen"), groups by name."""
    groups: dict[str, list[int]] = {}
    for prompt in prompts:
        for group in prompt.groups:
            groups.setdefault(group, []).append(prompt.prompt_id)
    return dict(sorted(groups.items()))


def score_segmentation(score: ScoreConfig, sample: SampleConfig, grounding: GroundingLayersConfig,
                       models: ModelsConfig, model_dir: str, unet_dir: str | None, cache_uri: str,
                       out_uri: str) -> str:
    """Attention-map mIoU on the held-out mask-cache images -> segmentation.json URI."""
    image_ids = heldout_image_ids(MaskCache(cache_uri).image_ids(), score.heldout_images)
    with pinned_threads(score.torch_threads):
        result = segmentation_miou(score, sample, grounding, models, model_dir, cache_uri, image_ids,
                                   unet_dir=unet_dir, overlays_uri=storage.join(out_uri, "overlays"),
                                   max_overlays=score.report_overlays)
    write_per_unit(pd.DataFrame([(f"image {image} noun {i}", "attention mIoU", value)
                                 for image, values in result["per_image"].items() for i, value in enumerate(values)],
                                columns=PER_UNIT_COLUMNS), out_uri, "miou")
    uri = storage.join(out_uri, "segmentation.json")
    storage.atomic_write_json(uri, result)
    return uri


def runs_by_model(scored: list[ScorePlan]) -> dict[str, list[str]]:
    """Scores folders grouped by the model that made the samples (a report's runs)."""
    runs: dict[str, list[str]] = {}
    for plan in scored:
        runs.setdefault(plan.model, []).append(plan.out_uri)
    return runs


def baseline_pairs(plans: list[ScorePlan]) -> dict[str, tuple[str, str]]:
    """Label -> (base, trained run) for every trained run sampled with the same prompts and
    seeds as a base-model run among ``plans``: those are paired prompt by prompt."""
    def paired_on(plan: ScorePlan) -> tuple:
        sample = plan.sample
        return sample.prompts, sample.max_prompts, sample.images_per_prompt, sample.seed

    bases = {paired_on(plan) for plan in plans if plan.model == "base"}
    return {f"{plan.model} − base": ("base", plan.model) for plan in plans
            if plan.model != "base" and paired_on(plan) in bases}


def stage_inputs(plan: ScorePlan, cache: HeldoutCache | None, reference: FidReference | None) -> dict[str, Any]:
    """What a scores folder was made from, for its record."""
    return {"samples": plan.samples_uri, "samples_identity": plan.samples_identity,
            "mask_cache": cache.uri if cache else None, "mask_cache_identity": cache.identity if cache else None,
            "fid_reference": reference.manifest_uri if reference else None,
            "fid_reference_identity": reference.identity if reference else None}
