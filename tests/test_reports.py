"""Reports: files exist, the table compares every run, the HTML points at real images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from tokencompose_core import storage
from tokencompose_core.reports import RunScores, load_run_scores, multigen_record, write_report
from tokencompose_core.sampling import png_bytes


def _mg_table(base: float) -> pd.DataFrame:
    return pd.DataFrame({"mean": [base + 40, base + 30, base + 20, base + 10, base], "std": [1.0] * 5},
                        index=[f"MG{k}" for k in range(1, 6)])


def _samples(folder: Path) -> str:
    rows = []
    for prompt_id in range(2):
        for index in range(2):
            uri = str(folder / "images" / f"p{prompt_id}_i{index}.png")
            storage.atomic_write_bytes(uri, png_bytes(np.full((16, 16, 3), 40 * index, dtype=np.uint8)))
            rows.append((prompt_id, index, 0, f"a photo of thing {prompt_id}", uri, "fp"))
    index_uri = str(folder / "index.parquet")
    storage.atomic_write_parquet(pd.DataFrame(rows, columns=["prompt_id", "image_index", "seed", "prompt",
                                                             "image_uri", "model_fingerprint"]), index_uri)
    return index_uri


def test_report_from_plain_data_and_from_scores_folders(tmp_path: Path) -> None:
    overlay = str(tmp_path / "overlays" / "img_cat.png")
    storage.atomic_write_bytes(overlay, png_bytes(np.zeros((8, 24, 3), dtype=np.uint8)))
    miou = {"overall": {"miou_fixed": 41.5, "miou_best": 55.25, "best_threshold": 0.3},
            "groups": {"up_16": {"miou_fixed": 40.0, "miou_best": 50.0, "best_threshold": 0.3},
                       "mid_4": {"miou_fixed": 20.0, "miou_best": 25.0, "best_threshold": 0.6}},
            "overlays": [{"title": "a cat — cat", "uri": overlay}]}
    base = RunScores(multigen={"coco": _mg_table(1.0), "ade20k": _mg_table(2.0)}, images_per_s=3.5,
                     samples={"coco": _samples(tmp_path / "base")})
    # The second run comes from a scores folder, as the evaluate stage writes it.
    scores_dir = str(tmp_path / "scores" / "tuned-coco")
    storage.atomic_write_json(storage.join(scores_dir, "multigen.json"),
                              multigen_record("tuned", "coco", _mg_table(5.0), _samples(tmp_path / "tuned")))
    # The sampling run's clock is read from its own folder, not copied into the scores.
    storage.atomic_write_json(str(tmp_path / "tuned" / "stats.json"), {"images": 4, "seconds": 2.0, "images_per_s": 2.0})
    storage.atomic_write_json(str(tmp_path / "tuned" / "sample_meta.json"),
                              {"sample": {"num_inference_steps": 50, "batch_size": 4}})
    storage.atomic_write_json(storage.join(scores_dir, "segmentation.json"), miou)
    assert load_run_scores([scores_dir]).miou["overall"]["miou_best"] == 55.25

    out = str(tmp_path / "report")
    uris = write_report({"base": base, "tuned": scores_dir}, out)
    for key in ("md", "html", "png_multigen", "png_miou"):
        assert Path(uris[key]).is_file(), key
    assert Path(uris["png_multigen"]).read_bytes()[:4] == b"\x89PNG"

    markdown = Path(uris["md"]).read_text()
    assert "| base | 32.00 ± 1.00 | 22.00 ± 1.00 |" in markdown  # ade20k sorts before coco
    assert "35.00 ± 1.00" in markdown  # tuned coco MG2
    assert "55.25" in markdown and "3.500" in markdown and "2.000" in markdown
    assert "0.500 (50 steps, batch 4)" in markdown  # tuned's latency, from its samples folder
    assert "ade20k MG5" in markdown  # a prompt set one run lacks still gets its columns

    page = Path(uris["html"]).read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    sample_refs = [s for s in sources if s.endswith(".png") and "/images/" in s]
    assert len(sample_refs) == 8  # 2 runs x 2 prompts x 2 images
    for src in sources:  # every referenced file exists relative to the report
        assert (Path(out) / src).resolve().is_file(), src
    assert "a cat — cat" in page and "overlays/img_cat.png" in page


def test_a_runs_miou_units_count_once_across_its_scores_folders(tmp_path: Path) -> None:
    """Two prompt sets scored with the same mask cache hold the same mIoU units; paired
    intervals need each (unit, metric) once per run."""
    from tokencompose_core.intervals import paired_intervals

    runs = {}
    for model, shift in (("base", 0.0), ("tuned", 5.0)):
        folders = []
        for prompt_set in ("coco", "ade20k"):
            folder = str(tmp_path / f"{model}-{prompt_set}")
            storage.atomic_write_json(storage.join(folder, "multigen.json"),
                                      multigen_record(model, prompt_set, _mg_table(shift)))
            units = pd.DataFrame({"unit": ["image 1 noun 0", "image 2 noun 0"], "metric": ["mIoU"] * 2,
                                  "value": [40.0 + shift, 50.0 + shift]})
            storage.atomic_write_parquet(units, storage.join(folder, "per_unit_segmentation.parquet"))
            folders.append(folder)
        runs[model] = load_run_scores(folders)
    assert len(runs["tuned"].per_unit) == 2
    (miou,) = paired_intervals(runs["base"].per_unit, runs["tuned"].per_unit, 1000, 0)
    assert miou["difference"] == 5.0 and miou["units"] == 2
