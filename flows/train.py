"""Stage 3 flow: fine-tune the U-Net on the mask cache with the grounding losses.

    tokencompose train -p tiny train.max_steps=50 train.learning_rate=1e-4
    tokencompose train -p sd14 --input runs/sd14/masks train.run_name=tokencompose-sd14

The run folder is ``<root>/train/<run>``: ``train.run_name``, else a digest of
the models, the configuration up to this stage and the mask cache's contents, so
a changed setting never resumes another setting's checkpoints. Several GPUs:
``accelerate launch -m tokencompose_core.train`` (see tokencompose_core/train.py).
"""

from __future__ import annotations

import hashlib
import json

from prefect import flow

from tasks.common import stage_fingerprint
from tasks.train import train_task
from tokencompose_core import storage
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.mask_cache import completed_shards


def cache_digest(cache_uri: str) -> str:
    """Digest of the committed shards (rows and fingerprints) of a mask cache."""
    shards = completed_shards(cache_uri)
    if not shards:
        raise FileNotFoundError(f"no committed mask-cache shards in {cache_uri}: run `tokencompose masks` first")
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(config: PipelineConfig, cache_uri: str, fingerprint: str) -> str:
    name = config.train.run_name
    if not name:
        name = "run-" + hashlib.sha256(f"{fingerprint};{cache_uri}".encode()).hexdigest()[:12]
    return storage.join(config.storage.root, "train", name)


@flow(name="train", log_prints=True)
def train_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 3. ``input_uri``: the mask cache (default: stage 2's output under the storage root)."""
    config = load_config(profile, overrides)
    cache_uri = storage.check_input(input_uri or storage.join(config.storage.root, "masks"), config.storage)
    if config.train.init_model:
        storage.check_input(config.train.init_model, config.storage)
    fingerprint = f"{stage_fingerprint(config, 'train')}-{cache_digest(cache_uri)}"
    output_uri = run_dir(config, cache_uri, fingerprint)
    result = train_task(config.model_dump(mode="json"), cache_uri, output_uri, None, fingerprint)
    print(f"train: {result['global_step']} steps -> {result['unet_uri']} (losses {result['final_losses']})")
    return {**result, "cache_uri": cache_uri}
