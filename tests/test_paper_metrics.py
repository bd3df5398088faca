"""FID, CLIP score, paired bootstrap intervals and latency: the evaluation a paper needs.

Unit tests on known inputs, then `tokencompose run -p tiny` through the CLI, which
must write FID, CLIP score, MultiGen and mIoU into the report, and a base-model run
scored beside the trained one, which must add paired intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tokencompose_core import storage
from tokencompose_core.intervals import bootstrap_mean_differences, paired_intervals


def test_bootstrap_interval_is_seeded_and_covers_a_known_shift() -> None:
    rng = np.random.default_rng(1)
    baseline = rng.normal(50, 10, size=400)
    treated = baseline + 3.0 + rng.normal(0, 1, size=400)  # a true mean shift of 3 points
    table = lambda values: pd.DataFrame({"unit": [f"prompt {i}" for i in range(400)], "metric": "MG2",  # noqa: E731
                                         "value": values})
    (row,) = paired_intervals(table(baseline), table(treated), resamples=2000, seed=0)
    assert row["metric"] == "MG2" and row["units"] == 400
    assert row["low"] < 3.0 < row["high"] and row["high"] - row["low"] < 0.5  # paired: noise of 1, not of 10
    assert row["difference"] == pytest.approx(float(np.mean(treated - baseline)))
    assert paired_intervals(table(baseline), table(treated), resamples=2000, seed=0) == [row]
    # No difference at all: the interval is the single point 0.
    (same,) = paired_intervals(table(baseline), table(baseline), resamples=1000, seed=0)
    assert same["low"] == same["high"] == same["difference"] == 0.0


def test_bootstrap_leaves_out_units_a_metric_lacks() -> None:
    differences = np.array([[1.0, np.nan], [1.0, 2.0], [1.0, 4.0]])
    low, high = bootstrap_mean_differences(differences, resamples=1000, seed=0)
    assert low[0] == high[0] == 1.0 and 2.0 <= low[1] <= high[1] <= 4.0
    with pytest.raises(ValueError, match="no paired units"):
        bootstrap_mean_differences(np.zeros((0, 2)), resamples=1000, seed=0)


def _images(folder: Path, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    return uris


def test_fid_is_zero_against_itself_and_grows_with_a_different_set(tmp_path: Path) -> None:
    from tokencompose_core.image_metrics import fid_score, reference_statistics
    from tokencompose_core.models.scorers import load_inception

    images = _images(tmp_path / "ref", 4, seed=0)
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps({"image": u, "captions": ["x"]}) + "\n" for u in images))
    inception = load_inception("tiny", 0, num_features=64)
    stats = reference_statistics(str(tmp_path / "ref.jsonl"), None, inception, str(tmp_path / "stats"), 2)
    same = pd.DataFrame({"prompt_id": range(4), "image_index": 0, "image_uri": images})
    other = same.assign(image_uri=[np.asarray(Image.open(u)) for u in images])
    for i, array in enumerate(other["image_uri"]):  # the same images, darkened: a shifted distribution
        Image.fromarray((array // 4).astype(np.uint8)).save(tmp_path / f"dark{i}.png")
    other["image_uri"] = [str(tmp_path / f"dark{i}.png") for i in range(4)]
    results = {}
    for name, frame in (("same", same), ("other", other)):
        storage.atomic_write_parquet(frame, str(tmp_path / name / "index.parquet"))
        uri = fid_score(str(tmp_path / name / "index.parquet"), stats, inception, str(tmp_path / name), 3)
        results[name] = storage.read_json(uri)
    assert results["same"]["fid"] == pytest.approx(0.0, abs=1e-3) and results["same"]["reference_images"] == 4
    assert results["other"]["fid"] > 1.0


def test_missing_inception_weights_name_the_file(tmp_path: Path) -> None:
    from tokencompose_core.models import MissingWeightsError
    from tokencompose_core.models.scorers import load_inception

    missing = str(tmp_path / "pt_inception.pth")
    with pytest.raises(MissingWeightsError, match="pt_inception.pth.*score.inception_weights"):
        load_inception(missing)


def test_clip_score_per_image_and_per_prompt(tmp_path: Path) -> None:
    from tokencompose_core.config import ScoreConfig
    from tokencompose_core.scoring import score_clip

    images = _images(tmp_path / "samples", 4, seed=2)
    index = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "image_index": [0, 1, 0, 1], "prompt": ["a cat", "a cat",
                          "a dog and a kite", "a dog and a kite"], "image_uri": images})
    storage.atomic_write_parquet(index, str(tmp_path / "samples" / "index.parquet"))
    uri = score_clip(str(tmp_path / "samples" / "index.parquet"), ScoreConfig(metrics_batch_size=3), 0, "coco",
                     str(tmp_path / "scores"))
    record = storage.read_json(uri)
    per_prompt = storage.read_parquet(str(tmp_path / "scores" / "per_unit_clip.parquet"))
    assert record["images"] == 4 and 0.0 <= record["clip_score"] <= 100.0
    assert list(per_prompt["unit"]) == ["prompt 0", "prompt 1"]
    assert per_prompt["value"].mean() == pytest.approx(record["clip_score"])
