"""Stage 4, sample: the profile's prompts from the base model or a trained run, batched and seeded.

Output: ``<root>/samples/<tag or model-prompt set>-<key>/`` (images, ``index.parquet``,
``stats.json``), the key from the sampling settings (and everything upstream) and
the weights' content. Units: ``sample.num_shards`` shards (every n-th image each),
then one merge of their indexes. Each image's seed depends only on (prompt, index),
so an image does not depend on its shard or batch.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from tokencompose_core import lora, outputs, storage
from tokencompose_core.checkpoints import DENOISER_DIRS
from tokencompose_core.config import PipelineConfig
from tokencompose_core.sampling import merge_shards, model_fingerprint, prompt_file, prompt_set_name, sample
from tokencompose_core.stages import stage_fingerprint

__all__ = ["SamplePlan", "plan", "summary", "sample", "merge_shards", "model_name", "trained_unet", "samples_folder"]


@dataclass(frozen=True)
class SamplePlan:
    model_dir: str
    unet_dir: str | None  # None: the profile's model
    model_identity: str  # the weights' content
    fingerprint: str
    out_uri: str
    whole: bool
    shards: list[tuple[int, int]]
    prompt_set: str

    @property
    def inputs(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "unet_dir": self.unet_dir, "model_identity": self.model_identity}


def plan(config: PipelineConfig, input_uri: str | None) -> SamplePlan:
    """``input_uri``: a trained run folder holding ``unet/`` or ``lora/`` (default: the base model)."""
    from tokencompose_core.models import resolve_diffusion_dir

    if prompt_file(config.sample.prompts):
        storage.check_input(prompt_file(config.sample.prompts), config.storage)
    unet_dir = trained_unet(config, input_uri)
    model_dir = resolve_diffusion_dir(config.models)
    model_identity, fingerprint = model_fingerprint(model_dir, unet_dir), stage_fingerprint(config, "sample")
    out_uri = samples_folder(config, unet_dir, model_identity, fingerprint)
    shards = [(index, config.sample.num_shards) for index in range(config.sample.num_shards)]
    return SamplePlan(model_dir, unet_dir, model_identity, fingerprint, out_uri, outputs.keep_if_whole(out_uri), shards,
                      prompt_set_name(config.sample.prompts))


def seal(config: PipelineConfig, plan: SamplePlan, index_uri: str) -> None:
    outputs.seal(plan.out_uri, config, "sample", plan.fingerprint, plan.inputs)


def summary(plan: SamplePlan, index_uri: str) -> dict[str, Any]:
    stats = storage.read_json(storage.join(plan.out_uri, "stats.json"))
    return {"output_uri": plan.out_uri, "index_uri": index_uri, "model": model_name(plan.unet_dir),
            "prompt_set": plan.prompt_set, "images_per_s": stats.get("images_per_s")}


def model_name(unet_dir: str | None) -> str:
    """``base`` for the profile's model, else the trained run folder's name."""
    return posixpath.basename(posixpath.dirname(unet_dir.rstrip("/"))) if unet_dir else "base"


def trained_unet(config: PipelineConfig, run_uri: str | None) -> str | None:
    """The ``unet/`` (an MMDiT's ``transformer/``) of a trained run folder, or its ``lora/`` for a
    LoRA run (checked); None for the profile's model."""
    if not run_uri:
        return None
    run = storage.check_input(run_uri, config.storage)
    adapter = storage.join(run, lora.LORA_DIR)
    if storage.exists(storage.join(adapter, lora.WEIGHTS_NAME)):
        return adapter
    for name in DENOISER_DIRS:
        weights = storage.join(run, name)
        if storage.exists(storage.join(weights, "config.json")):
            return weights
    raise FileNotFoundError(f"{run_uri} has no trained {' or '.join(f'{name}/' for name in DENOISER_DIRS)} "
                            f"(with a config.json) nor {lora.LORA_DIR}/{lora.WEIGHTS_NAME}")


def samples_folder(config: PipelineConfig, unet_dir: str | None, model_identity: str, fingerprint: str) -> str:
    """``<root>/samples/<tag or model-prompt set>-<key>``, the key from what makes its pixels."""
    name = config.sample.tag or f"{model_name(unet_dir)}-{prompt_set_name(config.sample.prompts)}"
    return outputs.output_folder(config, "samples", name, [fingerprint, model_identity])
