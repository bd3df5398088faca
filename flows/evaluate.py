"""Stage 5 flow: score sample folders (MultiGen, attention mIoU) and report every scored run.

    tokencompose score -p tiny --input runs/tiny/samples/base-coco
    tokencompose score -p tiny          # every folder under <root>/samples
"""

from __future__ import annotations

import hashlib
import posixpath

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import stage_fingerprint
from tasks.evaluate import detect, report, score_multigen, score_segmentation
from tokencompose_core import storage
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.mask_cache import COMPLETED
from tokencompose_core.reports import comparison_table, load_run_scores
from tokencompose_core.sampling import model_fingerprint, prompt_set_name


def sample_folders(config: PipelineConfig, input_uri: str | None) -> list[str]:
    """The samples folder given, or every folder under <root>/samples with an index."""
    if input_uri:
        storage.check_input(input_uri, config.storage)
        if not storage.exists(storage.join(input_uri, "index.parquet")):
            raise FileNotFoundError(f"{input_uri} is not a samples folder (no index.parquet)")
        return [input_uri.rstrip("/")]
    root = storage.join(config.storage.root, "samples")
    fs, path = storage.filesystem(root)
    found = sorted(p for p in (fs.ls(path, detail=False) if fs.exists(path) else [])
                   if fs.exists(posixpath.join(p, "index.parquet")))
    if not found:
        raise FileNotFoundError(f"no samples folders under {root}; run `tokencompose sample` first")
    return [storage.join(root, posixpath.basename(p)) for p in found]


def _score_folder(config: PipelineConfig, samples: str, fingerprint: str) -> str:
    """Detect + MultiGen (+ mIoU when a mask cache exists) for one samples folder."""
    meta = storage.read_json(storage.join(samples, "sample_meta.json"))
    spec, max_prompts = meta["sample"]["prompts"], meta["sample"]["max_prompts"]
    unet_dir = meta["unet_dir"]
    model = posixpath.basename(posixpath.dirname(unet_dir.rstrip("/"))) if unet_dir else "base"
    out_uri = storage.join(config.storage.root, "scores", posixpath.basename(samples))
    index_uri = storage.join(samples, "index.parquet")
    # The samples' own settings fingerprint ties the scores to exactly those images.
    key = f"{fingerprint}-{meta['settings_fingerprint']}"
    score = config.score
    detections = detect(index_uri, spec, max_prompts, config.models.model_dump(mode="json"), out_uri,
                        score.store_threshold, score.detector_batch_size, score.device, key)
    score_multigen(detections, index_uri, spec, max_prompts, score.detection_threshold, out_uri, model,
                   prompt_set_name(spec), key)
    cache_uri = storage.check_input(score.mask_cache or storage.join(config.storage.root, "masks"), config.storage)
    if score.heldout_images and storage.exists(storage.join(cache_uri, COMPLETED)):
        # New committed shards change the held-out images: the cache manifest is part of the key.
        manifest = hashlib.sha256(storage.read_bytes(storage.join(cache_uri, COMPLETED))).hexdigest()[:16]
        seg_key = f"{fingerprint}-{model_fingerprint(meta['model_dir'], unet_dir)}-{manifest}"
        score_segmentation(config.model_dump(mode="json"), meta["model_dir"], unet_dir, cache_uri, out_uri, seg_key)
    else:
        get_run_logger().warning("no mask cache at %s: attention mIoU skipped", cache_uri)
    return out_uri


def scored_runs(config: PipelineConfig) -> dict[str, list[str]]:
    """Every scores folder under <root>/scores, grouped by the model that made the samples."""
    root = storage.join(config.storage.root, "scores")
    fs, path = storage.filesystem(root)
    runs: dict[str, list[str]] = {}
    for folder in sorted(fs.ls(path, detail=False) if fs.exists(path) else []):
        uri = storage.join(root, posixpath.basename(folder))
        if storage.exists(storage.join(uri, "multigen.json")):
            runs.setdefault(storage.read_json(storage.join(uri, "multigen.json"))["model"], []).append(uri)
    return runs


@flow(name="score", log_prints=True)
def evaluate_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """``input_uri``: a samples folder (with index.parquet); default every samples folder."""
    config = load_config(profile, overrides)
    fingerprint = stage_fingerprint(config, "score")
    scored = [_score_folder(config, samples, fingerprint) for samples in sample_folders(config, input_uri)]
    runs = scored_runs(config)
    out_uri = storage.join(config.storage.root, "reports")
    uris = report(runs, out_uri, f"{fingerprint}-{_scores_digest(runs)}")
    table = comparison_table({name: load_run_scores(folders) for name, folders in runs.items()})
    create_table_artifact(table=table.to_dict(orient="records"), key="tokencompose-scores",
                          description=f"{config.name}: MultiGen MG2-MG5, mIoU, images/s per run")
    create_markdown_artifact(markdown=storage.read_bytes(uris["md"]).decode("utf-8"), key="tokencompose-report",
                             description=f"{config.name}: report ({uris['html']})")
    print(f"report: {uris['html']}")
    return {"output_uri": out_uri, "scores": scored, "report": uris, "runs": sorted(runs)}


def _scores_digest(runs: dict[str, list[str]]) -> str:
    """Changes whenever any scores file changes, so the cached report is redone."""
    digest = hashlib.sha256()
    for folders in runs.values():
        for folder in folders:
            for name in ("multigen.json", "segmentation.json"):
                uri = storage.join(folder, name)
                if storage.exists(uri):
                    digest.update(storage.read_bytes(uri))
    return digest.hexdigest()[:16]
