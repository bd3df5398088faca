"""Stage 4 flow: sample the profile's prompts from the base model or a trained U-Net.

    tokencompose sample -p tiny --input runs/tiny/train/<run>   # fine-tuned U-Net
    tokencompose sample -p sd14 sample.prompts=multigen:ade20k  # base model

What it reads and writes: ``tokencompose_core.stages.sample``.
"""

from __future__ import annotations

from prefect import flow

from flows.stage import run_stage


@flow(name="sample", log_prints=True)
def sample_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """``input_uri``: a trained run folder holding ``unet/`` (default: the base model)."""
    return run_stage("sample", profile, overrides, input_uri)
