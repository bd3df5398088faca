"""Stage 4 flow: sample the profile's prompts from the base model or a trained U-Net.

    tokencompose sample -p tiny --input runs/tiny/train/<run>   # fine-tuned U-Net
    tokencompose sample -p sd14 sample.prompts=multigen:ade20k  # base model
"""

from __future__ import annotations

import posixpath

from prefect import flow

from tasks.common import stage_fingerprint
from tasks.sample import merge_sample_shards, sample_shard
from tokencompose_core import storage
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.models import resolve_diffusion_dir
from tokencompose_core.sampling import model_fingerprint, prompt_set_name


def model_name(input_uri: str | None) -> str:
    """``base`` for the profile's model, else the trained run folder's name."""
    return posixpath.basename(input_uri.rstrip("/")) if input_uri else "base"


def samples_uri(config: PipelineConfig, input_uri: str | None) -> str:
    tag = config.sample.tag or f"{model_name(input_uri)}-{prompt_set_name(config.sample.prompts)}"
    return storage.join(config.storage.root, "samples", tag)


@flow(name="sample", log_prints=True)
def sample_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """``input_uri``: a trained run folder holding ``unet/`` (default: the base model)."""
    config = load_config(profile, overrides)
    if not config.sample.prompts.startswith("multigen:"):
        storage.check_input(config.sample.prompts, config.storage)
    unet_dir = None
    if input_uri:
        unet_dir = storage.join(storage.check_input(input_uri, config.storage), "unet")
        if not storage.exists(storage.join(unet_dir, "config.json")):
            raise FileNotFoundError(f"{input_uri} has no trained unet/ (expected {unet_dir}/config.json)")
    model_dir = resolve_diffusion_dir(config.models)
    out_uri = samples_uri(config, input_uri)
    fingerprint = f"{stage_fingerprint(config, 'sample')}-{model_fingerprint(model_dir, unet_dir)}"
    shards = config.sample.num_shards
    futures = [sample_shard.submit(config.model_dump(mode="json"), model_dir, out_uri, unet_dir, (i, shards),
                                   fingerprint) for i in range(shards)]
    index_uri = merge_sample_shards(out_uri, shards, [f.result() for f in futures], fingerprint)
    stats = storage.read_json(storage.join(out_uri, "stats.json"))
    print(f"samples: {index_uri} ({stats})")
    return {"output_uri": out_uri, "index_uri": index_uri, "model": model_name(input_uri),
            "prompt_set": prompt_set_name(config.sample.prompts), "images_per_s": stats.get("images_per_s")}
