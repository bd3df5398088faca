"""Stage 3, train: fine-tune the U-Net (or a LoRA adapter) on the mask cache with the grounding losses.

Output: ``<root>/train/run-<key>/`` (or ``train.run_name``): ``unet/`` or ``lora/``,
``checkpoints/``, ``metrics.jsonl``, ``loss_curve.png``; the key from the training
settings (and everything upstream) and the mask cache's content, so a changed
setting never resumes another setting's checkpoints. One unit: the training run
(:func:`tokencompose_core.train.train`, the loop ``accelerate launch`` runs too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokencompose_core import outputs, storage
from tokencompose_core.checkpoints import result_files
from tokencompose_core.config import PipelineConfig
from tokencompose_core.identity import uri_identity
from tokencompose_core.mask_cache import require_committed
from tokencompose_core.stages import stage_fingerprint
from tokencompose_core.stages.masks import current_cache
from tokencompose_core.train import train

__all__ = ["TrainPlan", "plan", "summary", "train", "result_files"]


@dataclass(frozen=True)
class TrainPlan:
    cache_uri: str
    cache_identity: str
    fingerprint: str
    out_uri: str
    whole: bool

    @property
    def inputs(self) -> dict[str, Any]:
        return {"mask_cache": self.cache_uri, "mask_cache_identity": self.cache_identity}


def plan(config: PipelineConfig, input_uri: str | None) -> TrainPlan:
    """``input_uri``: the mask cache (default: stage 2's output for these settings, else the
    newest import of the authors' data)."""
    cache_uri = storage.check_input(input_uri or current_cache(config), config.storage)
    for uri in (config.train.init_model, config.train.init_unet):
        if uri:
            storage.check_input(uri, config.storage)
    identity, fingerprint = uri_identity(require_committed(cache_uri)), stage_fingerprint(config, "train")
    out_uri = outputs.output_folder(config, "train", config.train.run_name or "run",
                                    None if config.train.run_name else [fingerprint, identity])
    return TrainPlan(cache_uri, identity, fingerprint, out_uri, outputs.keep_if_whole(out_uri))


def seal(config: PipelineConfig, plan: TrainPlan, result: dict[str, Any]) -> None:
    """The record lists the run's result (weights, metrics), not the checkpoints on the way."""
    outputs.seal(plan.out_uri, config, "train", plan.fingerprint, plan.inputs, files=result_files(plan.out_uri))


def summary(plan: TrainPlan, result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "cache_uri": plan.cache_uri}
