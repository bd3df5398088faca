"""Stage 5 flow: score sample folders (MultiGen, attention mIoU, FID, CLIP score) and report them.

    tokencompose score -p tiny --input runs/tiny/samples/base-coco-<key>
    tokencompose score -p tiny          # every finished folder under <root>/samples

What it reads and writes: ``tokencompose_core.stages.score``.
"""

from __future__ import annotations

from prefect import flow

from flows.stage import run_stage


@flow(name="score", log_prints=True)
def evaluate_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """``input_uri``: a samples folder (with index.parquet); default every finished samples folder."""
    return run_stage("score", profile, overrides, input_uri)
