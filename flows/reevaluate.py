"""Scheduled re-evaluation: score the newest trained U-Net and compare with the last one.

Run by the cron deployment in ``deployments/prefect.yaml``: it finds the newest
trained U-Net under ``<root>/train`` (a run's final ``unet/`` or a checkpoint
holding one), samples and scores it with the profile's settings, compares the
headline scores with those of the previously evaluated checkpoint and publishes
the comparison as a Prefect table artifact. The history of every evaluation is
kept in ``<root>/reevaluations/history.json``.

    reevaluate_flow("sd14")                       # the newest checkpoint
    reevaluate_flow("sd14", input_uri="runs/sd14/train/run-a")  # a given one
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.common import configured
from tokencompose_core import storage
from tokencompose_core.config import PipelineConfig, load_config

# Where trained U-Nets live, relative to <root>/train: a run's final one and checkpoints'.
_UNET_GLOBS = ("*/unet/config.json", "*/checkpoints/*/unet/config.json")


def newest_checkpoint(config: PipelineConfig) -> str:
    """URI of the most recently written folder under <root>/train that holds a ``unet/``."""
    train_root = storage.join(config.storage.root, "train")
    fs, path = storage.filesystem(train_root)
    found: list[tuple[float, str]] = []
    for pattern in _UNET_GLOBS:
        for config_path, info in fs.glob(posixpath.join(path, pattern), detail=True).items():
            folder = posixpath.dirname(posixpath.dirname(config_path))
            if any(part.startswith(".") for part in posixpath.relpath(folder, path).split("/")):
                continue  # a checkpoint still being written (training publishes by renaming .tmp-*)
            found.append((_modified(info), storage.join(train_root, posixpath.relpath(folder, path))))
    if not found:
        raise FileNotFoundError(f"no trained U-Net under {train_root}; run `tokencompose train` first")
    return max(found)[1]


def _modified(info: dict[str, Any]) -> float:
    """Modification time across filesystems (local ``mtime``, object stores ``LastModified``...)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    raise ValueError(f"no modification time in file info {sorted(info)}")


def headline_scores(scores_uri: str) -> dict[str, float]:
    """MG2..MG5 means of one prompt set, plus attention mIoU when it was measured."""
    record = storage.read_json(storage.join(scores_uri, "multigen.json"))
    prompt_set = record["prompt_set"]
    scores = {f"{prompt_set} {k}": float(record["scores"][k]["mean"]) for k in ("MG2", "MG3", "MG4", "MG5")}
    segmentation = storage.join(scores_uri, "segmentation.json")
    if storage.exists(segmentation):
        overall = storage.read_json(segmentation)["overall"]
        scores.update({"mIoU best": float(overall["miou_best"]), "mIoU fixed": float(overall["miou_fixed"])})
    return scores


def comparison_rows(current: dict[str, float], previous: dict[str, float] | None) -> list[dict[str, Any]]:
    """One row per metric: previous, current and the change (None where unknown)."""
    rows = []
    for metric, value in current.items():
        before = previous.get(metric) if previous else None
        rows.append({"metric": metric, "previous": before, "current": round(value, 4),
                     "change": None if before is None else round(value - before, 4)})
    return rows


def _sample_tag(checkpoint: str, train_root: str) -> str:
    """``reeval-<run>[-<checkpoint>]``: a simple, unique folder name per checkpoint."""
    relative = posixpath.relpath(checkpoint.rstrip("/"), train_root.rstrip("/"))
    return "reeval-" + relative.replace("/checkpoints/", "-").replace("/", "-")


@flow(name="reevaluate", log_prints=True)
def reevaluate_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Score ``input_uri`` (a folder with ``unet/``; default the newest) against the last evaluation."""
    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow

    overrides = list(overrides or [])
    config = load_config(profile, overrides)
    checkpoint = (input_uri or newest_checkpoint(config)).rstrip("/")
    tagged = overrides + [f"sample.tag={_sample_tag(checkpoint, storage.join(config.storage.root, 'train'))}"]
    samples = configured(sample_flow, config)(profile=profile, overrides=tagged, input_uri=checkpoint)
    scored = configured(evaluate_flow, config)(profile=profile, overrides=tagged, input_uri=samples["output_uri"])
    scores_uri = scored["scores"][0]
    current = headline_scores(scores_uri)

    history_uri = storage.join(config.storage.root, "reevaluations", "history.json")
    history = storage.read_json(history_uri) if storage.exists(history_uri) else []
    # Compare with the last *other* checkpoint: a cron run without a new checkpoint
    # still shows the last improvement rather than a row of zeros.
    previous = next((entry for entry in reversed(history) if entry["checkpoint"] != checkpoint), None)
    rows = comparison_rows(current, previous["scores"] if previous else None)
    against = previous["checkpoint"] if previous else "nothing (first evaluation)"
    create_table_artifact(table=rows, key="reevaluation",
                          description=f"{config.name}: {checkpoint} vs {against}")
    history = [entry for entry in history if entry["checkpoint"] != checkpoint]
    history.append({"checkpoint": checkpoint, "scores_uri": scores_uri, "scores": current,
                    "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    storage.atomic_write_json(history_uri, history)
    print(f"re-evaluated {checkpoint}: {current} (previous: {against})")
    return {"checkpoint": checkpoint, "output_uri": scores_uri, "history_uri": history_uri,
            "previous": previous["checkpoint"] if previous else None, "comparison": rows}
