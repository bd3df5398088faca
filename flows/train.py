"""Stage 3 flow: fine-tune the U-Net on the mask cache with the grounding losses.

    tokencompose train -p tiny train.max_steps=50 train.learning_rate=1e-4
    tokencompose train -p sd14 --input runs/sd14/masks/masks-<key> train.run_name=tokencompose-sd14

The run folder is ``<root>/train/<run>``: ``train.run_name``, else ``run-<key>``
with the key from the training settings (and everything upstream) and the mask
cache's content, so a changed setting never resumes another setting's
checkpoints. Several GPUs: ``accelerate launch -m tokencompose_core.train``.
"""

from __future__ import annotations

from prefect import flow

from tasks.common import recompute_unless
from tasks.train import train_task
from tokencompose_core import outputs, storage
from tokencompose_core.config import load_config
from tokencompose_core.mask_cache import cache_identity
from tokencompose_core.stages import stage_fingerprint
from tokencompose_core.checkpoints import result_files, run_folder


@flow(name="train", log_prints=True)
def train_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 3. ``input_uri``: the mask cache (default: stage 2's output for these settings)."""
    config = load_config(profile, overrides)
    cache_uri = storage.check_input(input_uri or outputs.current(config, "masks"), config.storage)
    if config.train.init_model:
        storage.check_input(config.train.init_model, config.storage)
    fingerprint, cache_digest = stage_fingerprint(config, "train"), cache_identity(cache_uri)
    output_uri = run_folder(config, fingerprint, cache_digest)
    result = recompute_unless(train_task, outputs.keep_if_whole(output_uri))(
        config.train, config.models, config.score.heldout_images, cache_uri, cache_digest, output_uri, fingerprint)
    outputs.seal(output_uri, config, "train", fingerprint, {"mask_cache": cache_uri, "mask_cache_identity": cache_digest},
                 files=result_files(output_uri))
    print(f"train: {result['global_step']} steps -> {result['unet_uri']} (losses {result['final_losses']})")
    return {**result, "cache_uri": cache_uri}
