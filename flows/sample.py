"""Stage 4 flow: sample the profile's prompts from the base model or a trained U-Net.

    tokencompose sample -p tiny --input runs/tiny/train/<run>   # fine-tuned U-Net
    tokencompose sample -p sd14 sample.prompts=multigen:ade20k  # base model

Output: ``<root>/samples/<tag or model-prompt set>-<key>``, the key from the
sampling settings (and everything upstream) and the weights' content.
"""

from __future__ import annotations

from prefect import flow

from tasks.common import recompute_unless
from tasks.sample import merge_sample_shards, sample_shard
from tokencompose_core import outputs, storage
from tokencompose_core.config import load_config
from tokencompose_core.models import resolve_diffusion_dir
from tokencompose_core.sampling import (
    model_fingerprint,
    model_name,
    prompt_file,
    prompt_set_name,
    samples_folder,
    trained_unet,
)
from tokencompose_core.stages import stage_fingerprint


@flow(name="sample", log_prints=True)
def sample_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """``input_uri``: a trained run folder holding ``unet/`` (default: the base model)."""
    config = load_config(profile, overrides)
    if prompt_file(config.sample.prompts):
        storage.check_input(prompt_file(config.sample.prompts), config.storage)
    unet_dir = trained_unet(config, input_uri)
    model_dir = resolve_diffusion_dir(config.models)
    model_identity, fingerprint = model_fingerprint(model_dir, unet_dir), stage_fingerprint(config, "sample")
    out_uri = samples_folder(config, unet_dir, model_identity, fingerprint)
    whole, shards = outputs.keep_if_whole(out_uri), config.sample.num_shards
    futures = [recompute_unless(sample_shard, whole).submit(
                   config.sample, config.models, model_dir, unet_dir, model_identity, out_uri, (i, shards), fingerprint)
               for i in range(shards)]
    index_uri = recompute_unless(merge_sample_shards, whole)(out_uri, shards, [f.result() for f in futures], fingerprint)
    outputs.seal(out_uri, config, "sample", fingerprint,
                 {"model_dir": model_dir, "unet_dir": unet_dir, "model_identity": model_identity})
    stats = storage.read_json(storage.join(out_uri, "stats.json"))
    print(f"samples: {index_uri} ({stats})")
    return {"output_uri": out_uri, "index_uri": index_uri, "model": model_name(unet_dir),
            "prompt_set": prompt_set_name(config.sample.prompts), "images_per_s": stats.get("images_per_s")}
