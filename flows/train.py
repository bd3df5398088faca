"""Stage 3 flow: fine-tune the U-Net on the mask cache with the grounding losses.

    tokencompose train -p tiny train.max_steps=50 train.learning_rate=1e-4
    tokencompose train -p sd14 --input runs/sd14/masks/masks-<key> train.run_name=tokencompose-sd14

What it reads and writes: ``tokencompose_core.stages.train``. Several GPUs:
``accelerate launch -m tokencompose_core.train``.
"""

from __future__ import annotations

from prefect import flow

from flows.stage import run_stage


@flow(name="train", log_prints=True)
def train_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Stage 3. ``input_uri``: the mask cache (default: stage 2's output for these settings)."""
    return run_stage("train", profile, overrides, input_uri)
