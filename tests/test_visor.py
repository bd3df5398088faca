"""VISOR on SR2D: the prompt set, OA and the VISOR metrics on hand-made detections, the
stage 5 path (detections -> visor.json -> report) on the tiny detector, and the OWL-ViT
detector plug-in."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import tiny_owlvit
from tokencompose_core import evaluation, outputs, storage, visor
from tokencompose_core.config import ModelsConfig, load_config
from tokencompose_core.models import MissingWeightsError, load_owlvit
from tokencompose_core.reports import write_report
from tokencompose_core.sampling import Prompt, load_prompts, png_bytes, prompt_file, prompt_set_name
from tokencompose_core.stages import score as scoring

CAT_LEFT_OF_DOG = Prompt(0, "a cat to the left of a dog", ("cat", "dog"), "to the left of")
CUP_ABOVE_CAR = Prompt(1, "a cup above a car", ("cup", "car"), "above")
CAT_AND_DOG = Prompt(2, "a cat and a dog", ("cat", "dog"))  # no relation: VISOR leaves it out
PROMPTS = [CAT_LEFT_OF_DOG, CUP_ABOVE_CAR, CAT_AND_DOG]


def test_sr2d_prompt_set() -> None:
    prompts = load_prompts("visor:sr2d")
    assert prompt_set_name("visor:sr2d") == "sr2d" and prompt_file("visor:sr2d") is None
    assert len(prompts) == 80 * 79 // 2 * 8 == 25_280  # pairs x relations x orders
    assert len({p.prompt_id for p in prompts}) == len(prompts)
    by_id = {p.prompt_id: p for p in prompts}
    # Ids and texts as SR2D itself numbers and words them (two of its published examples).
    assert by_id[1103] == Prompt(1103, "a kite to the right of a bicycle", ("kite", "bicycle"), "to the right of")
    assert by_id[11036] == Prompt(11036, "a cat below a bottle", ("cat", "bottle"), "below")
    assert by_id[0].text == "a person to the left of a bicycle" and by_id[1].text == "a bicycle to the left of a person"
    # Ids 8 and 9 of each pair are its "and" prompts, which VISOR does not score.
    assert not any(i % 10 in (8, 9) for i in by_id) and max(by_id) == 31_597
    assert Counter(p.relation for p in prompts) == {r: 6_320 for r in visor.RELATIONS}
    counts = Counter(c for p in prompts for c in p.categories)
    assert set(counts) == set(visor.COCO_CATEGORIES) and set(counts.values()) == {79 * 8}
    assert all(p.text == f"{visor.article(a)} {a} {p.relation} {visor.article(b)} {b}"
               for p in prompts for a, b in [p.categories])
    assert [visor.article(n) for n in ("apple", "umbrella", "hair drier", "tv")] == ["an", "an", "a", "a"]
    assert load_prompts("visor:sr2d", max_prompts=3) == prompts[:3]
    with pytest.raises(ValueError, match="unknown VISOR prompt set"):
        load_prompts("visor:sr3d")


def _box(x: float, y: float) -> list[float]:
    """A 4 px box centred on (x, y)."""
    return [x - 2, y - 2, x + 2, y + 2]


def _hand_made() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [
        # cat left of dog. i0: right. i1: one of two cats is left of the dog: right. i2: wrong
        # (the cat that would make it right scores below the threshold). i3: the dog is at the
        # threshold, not above it: cat only.
        (0, 0, "cat", 0.9, _box(10, 30)), (0, 0, "dog", 0.5, _box(50, 30)),
        (0, 1, "cat", 0.9, _box(50, 30)), (0, 1, "cat", 0.3, _box(5, 30)), (0, 1, "dog", 0.5, _box(10, 30)),
        (0, 2, "cat", 0.9, _box(60, 30)), (0, 2, "cat", 0.05, _box(0, 30)), (0, 2, "dog", 0.5, _box(10, 30)),
        (0, 3, "cat", 0.9, _box(10, 30)), (0, 3, "dog", 0.1, _box(50, 30)),
        # cup above car (y grows downwards). i0: right. i1: wrong ("Cup" matches "cup").
        # i2: nothing. i3: car only; a person is not one of the prompt's objects.
        (1, 0, "cup", 0.9, _box(30, 10)), (1, 0, "car", 0.9, _box(30, 40)),
        (1, 1, "Cup", 0.9, _box(30, 40)), (1, 1, "car", 0.9, _box(30, 10)),
        (1, 3, "car", 0.9, _box(30, 40)), (1, 3, "person", 0.9, _box(30, 5)),
        # The "and" prompt: not scored.
        (2, 0, "cat", 0.9, _box(10, 30)), (2, 0, "dog", 0.9, _box(50, 30)),
    ]
    detections = pd.DataFrame(rows, columns=evaluation.DETECTION_COLUMNS)
    images = pd.DataFrame([(p, i) for p in range(3) for i in range(4)], columns=["prompt_id", "image_index"])
    return detections, images


def test_visor_metrics_hand_computed() -> None:
    detections, images = _hand_made()
    outcomes = visor.image_outcomes(detections, PROMPTS, 0.1, images)
    assert len(outcomes) == 8  # 2 spatial prompts x 4 images
    assert outcomes["both"].tolist() == [True, True, True, False, True, True, False, False]
    assert outcomes["correct"].tolist() == [True, True, False, False, True, False, False, False]
    scores = visor.visor_scores(outcomes)
    # both: 5 of 8; first object: 6; second: 6; correct: 3 (of the 5 with both);
    # correct images per prompt: 2 and 1.
    assert scores == pytest.approx({"OA": 62.5, "OA_A": 75.0, "OA_B": 75.0, "VISOR_uncond": 37.5,
                                    "VISOR_cond": 60.0, "VISOR_1": 100.0, "VISOR_2": 50.0, "VISOR_3": 0.0,
                                    "VISOR_4": 0.0})
    per_prompt = visor.per_prompt(outcomes).set_index(["unit", "metric"])["value"]
    assert per_prompt[("prompt 0", "VISOR OA")] == 75.0 and per_prompt[("prompt 1", "VISOR_uncond")] == 25.0
    # Nothing above a high threshold: OA 0 and VISOR_cond undefined.
    assert visor.visor_scores(visor.image_outcomes(detections, PROMPTS, 0.95, images))["VISOR_cond"] is None
    with pytest.raises(ValueError, match="spatial"):
        visor.image_outcomes(detections, [CAT_AND_DOG], 0.1, images)


def test_relation_needs_strict_order() -> None:
    relations = pd.Series(visor.RELATIONS)
    same = np.full((4, 2), 5.0)
    assert not visor.relation_holds(relations, same, same).any()
    # (1, 9) against (3, 2): left of, and below (y grows downwards).
    first, second = np.tile([1.0, 9.0], (4, 1)), np.tile([3.0, 2.0], (4, 1))
    assert visor.relation_holds(relations, first, second).tolist() == [True, False, False, True]


def _samples(folder: Path, prompts: list[Prompt], images_per_prompt: int) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for prompt in prompts:
        for index in range(images_per_prompt):
            uri = str(folder / "images" / f"p{prompt.prompt_id}_i{index}.png")
            storage.atomic_write_bytes(uri, png_bytes(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
            rows.append((prompt.prompt_id, index, 0, prompt.text, uri, "fp"))
    index_uri = str(folder / "index.parquet")
    storage.atomic_write_parquet(pd.DataFrame(rows, columns=["prompt_id", "image_index", "seed", "prompt",
                                                             "image_uri", "model_fingerprint"]), index_uri)
    return index_uri


def test_stage5_scores_visor_and_reports_it(tmp_path: Path) -> None:
    """Stage 5's steps on SR2D with the tiny OWLv2: detections, multigen.json with the
    two-object accuracy, visor.json, and the report's VISOR table with the paper's OA."""
    config = load_config("tiny", ["score.store_threshold=0.0", "sample.prompts=visor:sr2d"])
    prompts = load_prompts(config.sample.prompts, max_prompts=2)
    index_uri = _samples(tmp_path / "samples", prompts, images_per_prompt=2)
    out = str(tmp_path / "scores")
    detections = scoring.detect(index_uri, prompts, config.models, config.score, out, batch_size=4)
    scoring.score_multigen(detections, index_uri, prompts, prompt_set_name(config.sample.prompts), 0.0, out, "base")
    record = storage.read_json(storage.join(out, "visor.json"))
    assert record["prompt_set"] == "sr2d" and record["images"] == 4 and record["prompts"] == 2
    assert set(record["scores"]) == set(visor.METRICS)
    assert all(0.0 <= record["scores"][k] <= 100.0 for k in ("OA", "VISOR_uncond", "VISOR_1", "VISOR_2"))
    assert record["scores"]["VISOR_3"] is None and record["scores"]["VISOR_4"] is None  # 2 images per prompt
    multigen = storage.read_json(storage.join(out, "multigen.json"))
    assert "object_accuracy" not in multigen and 0.0 <= multigen["two_object_accuracy"]["mean"] <= 100.0
    units = storage.read_parquet(storage.join(out, "per_unit_visor.parquet"))
    assert set(units["metric"]) == {"VISOR OA", "VISOR_uncond"} and len(units) == 4

    # Sealed as the flow seals it: the report names the detector the scores were made with.
    outputs.seal(out, config, "score", "fp", {})
    markdown = Path(write_report({"base": [out]}, str(tmp_path / "report"))["md"]).read_text()
    assert "VISOR on SR2D" in markdown and "sr2d two-object acc." in markdown
    visor_section = markdown.split("VISOR on SR2D", 1)[1]
    assert "| paper: SD 1.4 | 29.86 |" in visor_section and "| paper: TokenCompose | 52.15 |" in visor_section
    assert "29.86" not in markdown.split("VISOR on SR2D", 1)[0]  # the paper's OA sits only beside VISOR's
    assert "| owlv2 (tiny) |" in visor_section and "| owlvit (google/owlvit-base-patch32) |" in visor_section


def test_no_visor_json_for_other_prompt_sets(tmp_path: Path) -> None:
    detections, images = _hand_made()
    out = str(tmp_path / "scores")
    storage.atomic_write_parquet(detections[detections["prompt_id"] == 2], storage.join(out, "detections.parquet"))
    index_uri = _samples(tmp_path / "samples", [CAT_AND_DOG], images_per_prompt=1)
    scoring.score_multigen(storage.join(out, "detections.parquet"), index_uri, [CAT_AND_DOG], "pairs", 0.1, out,
                           "base")
    assert not storage.exists(storage.join(out, "visor.json"))
    assert storage.read_json(storage.join(out, "multigen.json"))["two_object_accuracy"]["mean"] == 100.0


def test_owlvit_detector_plugin(tmp_path: Path) -> None:
    prompts = [CAT_LEFT_OF_DOG, CUP_ABOVE_CAR]
    index_uri = _samples(tmp_path / "samples", prompts, images_per_prompt=1)
    config = load_config("tiny", ["score.detector=owlvit", "score.store_threshold=0.0",
                                  f"models.owlvit={tiny_owlvit(tmp_path / 'owlvit')}"])
    uri = scoring.detect(index_uri, prompts, config.models, config.score, str(tmp_path / "scores"), batch_size=2)
    detections = storage.read_parquet(uri)
    assert list(detections.columns) == evaluation.DETECTION_COLUMNS and len(detections) > 0
    assert all(row.category in prompts[row.prompt_id].categories for row in detections.itertuples())
    # OWL-ViT's relative boxes are scaled to the image itself (48 high, 64 wide), not to a padded square.
    model, processor = load_owlvit(config.models)
    image = evaluation.read_image(storage.read_parquet(index_uri)["image_uri"][0])
    with torch.no_grad():
        relative = model(**processor(text=[["a photo of a cat", "a photo of a dog"]], images=[image],
                                     return_tensors="pt")).pred_boxes[0]
    centres = relative[:, :2].numpy() * [64, 48]  # (cx, cy) of every box
    stored = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in detections[detections["prompt_id"] == 0]["box"]])
    assert len(stored) == len(centres) and np.allclose(np.sort(stored, axis=0), np.sort(centres, axis=0), atol=1e-3)


def test_owlvit_without_weights_names_them(tmp_path: Path) -> None:
    index_uri = _samples(tmp_path, [CAT_LEFT_OF_DOG], images_per_prompt=1)
    score = load_config("tiny", ["score.detector=owlvit"]).score
    with pytest.raises(MissingWeightsError, match="google/owlvit-base-patch32"):
        scoring.detect(index_uri, [CAT_LEFT_OF_DOG], ModelsConfig(), score, str(tmp_path / "scores"), 1)
    with pytest.raises(MissingWeightsError, match="google/owlvit-base-patch32"):
        scoring.detect(index_uri, [CAT_LEFT_OF_DOG], ModelsConfig(owlvit="google/owlvit-base-patch32"), score,
                       str(tmp_path / "scores"), 1)


def test_sample_and_score_flows_on_sr2d(prefect_harness, tmp_path: Path) -> None:
    """`sample.prompts=visor:sr2d` through the stage 4 and 5 flows: visor.json and the report's table."""
    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow

    overrides = [f"storage.root={tmp_path}", "sample.prompts=visor:sr2d", "sample.max_prompts=2",
                 "sample.images_per_prompt=2", "sample.num_inference_steps=2", "score.heldout_images=0",
                 "score.fid=false", "score.store_threshold=0.0"]
    sampled = sample_flow(profile="tiny", overrides=overrides)
    assert Path(sampled["output_uri"]).name.startswith("base-sr2d-")
    result = evaluate_flow(profile="tiny", overrides=overrides, input_uri=sampled["output_uri"])
    (scores,) = result["scores"]
    record = storage.read_json(storage.join(scores, "visor.json"))
    assert record["images"] == 4 and record["prompts"] == 2 and record["threshold"] == 0.1
    markdown = Path(result["report"]["md"]).read_text()
    assert "| base |" in markdown.split("VISOR on SR2D", 1)[1] and "| paper: TokenCompose | 52.15 |" in markdown
