"""Stages 4-5 as Prefect flows on the tiny profile: sample, score (MultiGen + mIoU), report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import flow_task_states
from tokencompose_core import storage
from tokencompose_core.sampling import png_bytes


def _mask_cache(root: Path) -> str:
    """Two 64 px images, each with two grounded nouns, committed as one shard."""
    from tokencompose_core.mask_cache import commit_shard, rows_frame, shard_row
    from tokencompose_core.models import clip_tokenizer
    from tokencompose_core.text import token_positions

    tokenizer = clip_tokenizer()
    rows = []
    for i in range(2):
        caption = "a photo of a cat and a teddy bear"
        image = np.full((64, 64, 3), 120, dtype=np.uint8)
        image[8:32, 8:32] = (200, 40, 40)
        image[36:60, 30:60] = (40, 40, 200)
        uri = str(root / "images" / f"img{i}.png")
        storage.atomic_write_bytes(uri, png_bytes(image))
        for noun, (ys, xs) in (("cat", (slice(8, 32), slice(8, 32))), ("teddy bear", (slice(36, 60), slice(30, 60)))):
            mask = np.zeros((64, 64), dtype=bool)
            mask[ys, xs] = True
            rows.append(shard_row(f"img{i}", uri, caption, 64, 64, "fp", noun=noun,
                                  token_positions=list(token_positions(caption, noun, tokenizer)), mask=mask,
                                  score=0.9))
    cache = str(root / "masks")
    commit_shard(cache, "shard-00000", rows_frame(rows))
    return cache


def test_sample_then_score_flows(prefect_harness, tmp_path: Path) -> None:
    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow

    cache = _mask_cache(tmp_path)
    overrides = [f"storage.root={tmp_path}", f"score.mask_cache={cache}", "sample.max_prompts=2", "sample.images_per_prompt=2", "sample.num_inference_steps=2",
                 "sample.num_shards=2", "score.heldout_images=2", "score.report_overlays=2",
                 "score.store_threshold=0.0"]
    sampled = sample_flow(profile="tiny", overrides=overrides)
    # Named after what made it: the model and prompt set, then the key of the settings and weights.
    assert Path(sampled["output_uri"]).parent == tmp_path / "samples"
    assert Path(sampled["output_uri"]).name.startswith("base-coco-")
    index = storage.read_parquet(sampled["index_uri"])
    assert len(index) == 4 and all(Path(u).is_file() for u in index["image_uri"])

    state = evaluate_flow(profile="tiny", overrides=overrides, input_uri=sampled["output_uri"], return_state=True)
    result = state.result()
    (scores,) = [Path(uri) for uri in result["scores"]]
    assert scores.parent == tmp_path / "scores" and scores.name.startswith("base-coco-")
    detections = storage.read_parquet(str(scores / "detections.parquet"))
    assert list(detections.columns) == ["prompt_id", "image_index", "category", "score", "box"]
    multigen = storage.read_json(str(scores / "multigen.json"))
    assert multigen["model"] == "base" and set(multigen["scores"]) == {f"MG{k}" for k in range(1, 6)}
    assert multigen["scores"]["MG1"]["mean"] == 100.0  # store/score thresholds 0 keep every box
    segmentation = storage.read_json(str(scores / "segmentation.json"))
    assert segmentation["images"] == 2 and segmentation["groups"]
    assert 0.0 <= segmentation["overall"]["miou_best"] <= 100.0
    assert len(segmentation["overlays"]) == 2 and all(Path(o["uri"]).is_file() for o in segmentation["overlays"])
    html = Path(result["report"]["html"]).read_text()
    assert "base" in html and "p0_i0.png" in html and "overlays/" in html

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tokencompose-scores", "tokencompose-report"])))
    assert {a.type for a in artifacts} >= {"table", "markdown"}

    # Same inputs again: every task is a cache hit.
    again = evaluate_flow(profile="tiny", overrides=overrides, input_uri=sampled["output_uri"], return_state=True)
    assert set(flow_task_states(again.state_details.flow_run_id)) == {"Cached"}


def test_sample_flow_refuses_a_run_without_unet(prefect_harness, tmp_path: Path) -> None:
    from flows.sample import sample_flow

    with pytest.raises(FileNotFoundError, match="no trained unet"):
        sample_flow(profile="tiny", overrides=[f"storage.root={tmp_path}"], input_uri=str(tmp_path / "nothing"))
