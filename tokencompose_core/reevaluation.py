"""Re-evaluation bookkeeping: the newest trained U-Net, headline scores, the history.

Used by the scheduled re-evaluation flow (``flows/reevaluate.py``): it samples and
scores the newest checkpoint and compares it with the previously evaluated one.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

from tokencompose_core import storage
from tokencompose_core.config import PipelineConfig

# Where trained models live, relative to <root>/train: a run's final one and checkpoints',
# whole (unet/, an MMDiT's transformer/) or as a LoRA adapter (lora/, tokencompose_core.lora).
_UNET_GLOBS = ("*/unet/config.json", "*/checkpoints/*/unet/config.json",
               "*/transformer/config.json", "*/checkpoints/*/transformer/config.json",
               "*/lora/pytorch_lora_weights.safetensors", "*/checkpoints/*/lora/pytorch_lora_weights.safetensors")


def newest_checkpoint(config: PipelineConfig) -> str:
    """URI of the most recently written folder under <root>/train that holds a ``unet/`` or ``lora/``."""
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


def sample_tag(checkpoint: str, train_root: str) -> str:
    """``reeval-<run>[-<checkpoint>]``: a simple, unique folder name per checkpoint."""
    relative = posixpath.relpath(checkpoint.rstrip("/"), train_root.rstrip("/"))
    return "reeval-" + relative.replace("/checkpoints/", "-").replace("/", "-")


def history_uri(config: PipelineConfig) -> str:
    return storage.join(config.storage.root, "reevaluations", "history.json")


def previous_evaluation(config: PipelineConfig, checkpoint: str) -> dict[str, Any] | None:
    """The last evaluation of another checkpoint: a cron run without a new checkpoint
    still shows the last improvement rather than a row of zeros."""
    uri = history_uri(config)
    history = storage.read_json(uri) if storage.exists(uri) else []
    return next((entry for entry in reversed(history) if entry["checkpoint"] != checkpoint), None)


def record_evaluation(config: PipelineConfig, checkpoint: str, scores_uri: str, scores: dict[str, float]) -> str:
    """Append (or replace) ``checkpoint``'s entry in the history; returns the history's URI."""
    uri = history_uri(config)
    history = storage.read_json(uri) if storage.exists(uri) else []
    history = [entry for entry in history if entry["checkpoint"] != checkpoint]
    history.append({"checkpoint": checkpoint, "scores_uri": scores_uri, "scores": scores,
                    "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    storage.atomic_write_json(uri, history)
    return uri


def checkpoint_to_evaluate(config: PipelineConfig, input_uri: str | None) -> tuple[str, str]:
    """(the checkpoint: ``input_uri`` or the newest, its samples' tag)."""
    checkpoint = (input_uri or newest_checkpoint(config)).rstrip("/")
    return checkpoint, sample_tag(checkpoint, storage.join(config.storage.root, "train"))


def compare_and_record(config: PipelineConfig, checkpoint: str, scores_uri: str) -> dict[str, Any]:
    """The checkpoint's headline scores against the previous evaluation's, recorded in the history."""
    current = headline_scores(scores_uri)
    previous = previous_evaluation(config, checkpoint)
    rows = comparison_rows(current, previous["scores"] if previous else None)
    return {"current": current, "previous": previous["checkpoint"] if previous else None, "rows": rows,
            "history_uri": record_evaluation(config, checkpoint, scores_uri, current)}
