"""MultiGen scoring on hand-made detections, two-object accuracy, mIoU on constructed maps,
OWLv2 detection schema with the tiny detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tokencompose_core import evaluation, mask_cache, storage
from tokencompose_core.evaluation import (
    iou_at_thresholds,
    multigen_scores,
    noun_maps,
    normalise,
    summarise_ious,
    two_object_accuracy,
)
from tokencompose_core.sampling import Prompt

PROMPTS = [
    Prompt(0, "a photo of a cat, a dog, and a cup.", ("cat", "dog", "cup")),
    Prompt(1, "a photo of a book, a kite, a car, a bus, and a vase.", ("book", "kite", "car", "bus", "vase")),
]


def _detections(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([(*r, [0.0, 0.0, 1.0, 1.0]) for r in rows], columns=evaluation.DETECTION_COLUMNS)


def test_multigen_scores_hand_computed() -> None:
    detections = _detections([
        # index 0: prompt 0 finds cat twice (counts once), dog; "person" is not in the prompt.
        (0, 0, "cat", 0.9), (0, 0, "cat", 0.8), (0, 0, "dog", 0.5), (0, 0, "person", 0.99),
        (0, 0, "cup", 0.1),  # exactly at the threshold: not above it
        # index 0: prompt 1 finds 5 categories; "Book" matches case-insensitively.
        (1, 0, "Book", 0.3), (1, 0, "kite", 0.3), (1, 0, "car", 0.3), (1, 0, "bus", 0.3), (1, 0, "vase", 0.2),
        # index 1: prompt 0 has only sub-threshold detections; prompt 1 finds 3 (one twice).
        (0, 1, "cat", 0.05), (1, 1, "book", 0.4), (1, 1, "book", 0.6), (1, 1, "kite", 0.2), (1, 1, "car", 0.9),
        # index 2: prompt 1 finds one; prompt 0 has no detections at all (still counts, as 0).
        (1, 2, "bus", 0.15),
    ])
    # found: idx0 -> [2, 5], idx1 -> [0, 3], idx2 -> [0, 1]
    scores = multigen_scores(detections, PROMPTS, threshold=0.1)
    assert list(scores.index) == ["MG1", "MG2", "MG3", "MG4", "MG5"]
    expected = {  # per-index percentages, then mean and population std
        "MG1": [100, 50, 50], "MG2": [100, 50, 0], "MG3": [50, 50, 0], "MG4": [50, 0, 0], "MG5": [50, 0, 0],
    }
    for k, values in expected.items():
        assert scores.loc[k, "mean"] == pytest.approx(np.mean(values))
        assert scores.loc[k, "std"] == pytest.approx(np.std(values))
    # A higher threshold drops idx0 prompt0's dog (0.5 stays) -> check MG2 at 0.55:
    strict = multigen_scores(detections, PROMPTS, threshold=0.55)
    # found: idx0 -> [1 (cat), 0], idx1 -> [0, 2 (book .6, car .9)], idx2 -> [0, 0]
    assert strict.loc["MG1", "mean"] == pytest.approx(np.mean([50, 50, 0]))
    assert strict.loc["MG2", "mean"] == pytest.approx(np.mean([0, 50, 0]))
    assert strict.loc["MG3", "mean"] == 0.0


def test_multigen_images_frame_sets_the_denominator() -> None:
    detections = _detections([(0, 0, "cat", 0.9), (0, 0, "dog", 0.9)])
    # Two prompts x two indices were sampled, although only one image has detections.
    images = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "image_index": [0, 1, 0, 1]})
    scores = multigen_scores(detections, PROMPTS, threshold=0.1, images=images)
    assert scores.loc["MG2", "mean"] == pytest.approx(np.mean([50, 0]))
    assert scores.loc["MG2", "std"] == pytest.approx(25.0)
    # Without the frame, only index 0 is known: 1 of its 2 images has 2 categories.
    assert multigen_scores(detections, PROMPTS).loc["MG2", "mean"] == pytest.approx(50.0)


def test_two_object_accuracy_two_object_prompts() -> None:
    # The three-object prompt is left out of two-object accuracy.
    prompts = [Prompt(0, "a cat and a dog", ("cat", "dog")), Prompt(1, "a cup and a car", ("cup", "car")),
               Prompt(2, "a cat, a cup and a car", ("cat", "cup", "car"))]
    detections = _detections([(0, 0, "cat", 0.9), (0, 0, "dog", 0.2), (1, 0, "cup", 0.9),
                              (0, 1, "cat", 0.9), (0, 1, "dog", 0.05), (1, 1, "cup", 0.5), (1, 1, "car", 0.5),
                              (2, 0, "cat", 0.9), (2, 0, "cup", 0.9)])
    accuracy = two_object_accuracy(detections, prompts, threshold=0.1)
    assert accuracy["mean"] == pytest.approx(50.0)  # idx0: 1/2, idx1: 1/2
    with pytest.raises(ValueError, match="two-object"):
        two_object_accuracy(detections, PROMPTS)


def test_iou_and_best_threshold_on_constructed_maps() -> None:
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # 4 pixels
    heat = torch.zeros(1, 4, 4)
    heat[0, :2, :2] = 1.0
    heat[0, 2, :2] = 0.6  # 2 extra pixels above 0.5 but below 0.7
    ious = iou_at_thresholds(normalise(heat), mask, np.array([0.5, 0.7]))
    assert ious[0] == pytest.approx([4 / 6, 1.0])
    summary = summarise_ious({"up_16": ious}, np.array([0.5, 0.7]), fixed=0.5)["up_16"]
    assert summary["miou_fixed"] == pytest.approx(400 / 6)
    assert summary["miou_best"] == pytest.approx(100.0)
    assert summary["best_threshold"] == 0.7


def test_noun_maps_sum_tokens_and_average_heads_and_layers() -> None:
    hw, tokens = 4, 6  # a 2x2 map, 6 text positions
    layer = torch.zeros(2, hw, tokens)  # (heads, HW, T)
    layer[0, 0, 1] = 1.0  # head 0, pixel 0, token 1
    layer[1, 3, 2] = 1.0  # head 1, pixel 3, token 2
    maps = noun_maps([layer, layer], [[1, 2], [2]], size=(2, 2))
    assert maps.shape == (2, 2, 2)
    assert maps[0].flatten().tolist() == pytest.approx([0.5, 0, 0, 0.5])
    assert maps[1].flatten().tolist() == pytest.approx([0, 0, 0, 0.5])


def test_segmentation_miou_perfect_maps_give_full_score(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose noun maps equal the masks scores 100 at every group; swapping nouns scores 0."""
    from tokencompose_core.config import load_config

    side = 8
    masks = np.zeros((2, side, side), dtype=np.uint8)
    masks[0, :4, :] = 1
    masks[1, 4:, :] = 1

    class Item:
        image_id, image_uri, caption = "img", "unused", "a cat and a dog"
        nouns, token_positions = ["cat", "dog"], [[2], [5]]

    Item.masks = masks

    def fake_attention(parts, capture, item, side_, timestep, device, supervised, guidance):
        perfect = torch.from_numpy(masks).float()
        return {"up_8": normalise(perfect), "mid_4": normalise(perfect.flip(0)), "overall": normalise(perfect)}

    class Cache:
        def __init__(self, uri: str) -> None: ...
        def get(self, image_id: str, size: tuple[int, int]) -> Item:
            return Item()

    class Capture:
        def __init__(self, unet, groups) -> None: ...
        def remove(self) -> None: ...

    class Parts:
        unet, denoiser, is_mmdit, sample_size, vae_scale_factor = None, None, False, side, 1

    import tokencompose_core.attention as attention
    import tokencompose_core.mask_cache as mask_cache

    monkeypatch.setattr(evaluation, "load_parts", lambda *a, **k: Parts())
    monkeypatch.setattr(attention, "supervised_groups", lambda unet, layers, size: {"up_8": ["a"], "mid_4": ["b"]})
    monkeypatch.setattr(attention, "AttentionCapture", Capture)
    monkeypatch.setattr(mask_cache, "MaskCache", Cache)
    monkeypatch.setattr(evaluation, "_image_attention", fake_attention)
    config = load_config("tiny")
    result = evaluation.segmentation_miou(config.score, config.sample, config.train.grounding, config.models, "model",
                                          "cache", ["img"])
    assert result["groups"]["up_8"]["miou_fixed"] == pytest.approx(100.0)
    assert result["groups"]["mid_4"]["miou_best"] == pytest.approx(0.0)
    assert result["overall"]["miou_fixed"] == pytest.approx(100.0)
    assert result["groups"]["up_8"]["nouns"] == 2


def test_heldout_ids_are_stable_and_nested() -> None:
    ids = [f"img{i}" for i in range(50)]
    five = mask_cache.heldout_image_ids(ids, 5)
    assert five == mask_cache.heldout_image_ids(list(reversed(ids)), 5)
    assert set(five) <= set(mask_cache.heldout_image_ids(ids, 10))


def test_detect_owlv2_tiny_writes_schema(tmp_path: Path) -> None:
    from tokencompose_core.config import ModelsConfig
    from tokencompose_core.sampling import png_bytes

    rng = np.random.default_rng(0)
    rows = []
    for prompt in PROMPTS:
        for index in range(2):
            uri = str(tmp_path / f"p{prompt.prompt_id}_i{index}.png")
            storage.atomic_write_bytes(uri, png_bytes(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)))
            rows.append((prompt.prompt_id, index, 0, prompt.text, uri, "fp"))
    index_uri = str(tmp_path / "index.parquet")
    storage.atomic_write_parquet(pd.DataFrame(rows, columns=["prompt_id", "image_index", "seed", "prompt",
                                                             "image_uri", "model_fingerprint"]), index_uri)
    models = ModelsConfig()
    uri = evaluation.detect_owlv2(index_uri, PROMPTS, models, str(tmp_path / "scores"),
                                  store_threshold=0.0, batch_size=3)
    detections = storage.read_parquet(uri)
    assert list(detections.columns) == evaluation.DETECTION_COLUMNS
    assert len(detections) > 0  # threshold 0 keeps every box of a random-init model
    assert set(detections["prompt_id"]) == {0, 1}
    for row in detections.itertuples():
        assert row.category in PROMPTS[row.prompt_id].categories
        assert len(row.box) == 4
    scores = multigen_scores(detections, PROMPTS, threshold=0.0)
    assert scores.loc["MG1", "mean"] == 100.0


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device")]),
])
def test_segmentation_miou_runs_on_the_pixel_space_model(tmp_path, device: str) -> None:
    """The real path (noise, one U-Net forward, captured maps) on the demo's 16 px model."""
    from tokencompose_core.config import load_config
    from tokencompose_core.mask_cache import commit_shard, rows_frame, shard_row
    from tokencompose_core.models import clip_tokenizer, resolve_diffusion_dir
    from tokencompose_core.sampling import png_bytes
    from tokencompose_core.text import token_positions

    caption, rows = "a photo of a circle and a square", []
    for i in range(2):
        image = np.full((16, 16, 3), 128, dtype=np.uint8)
        image[2:7, 2:7] = (255, 0, 0)
        image[9:14, 8:13] = (0, 0, 255)
        uri = str(tmp_path / f"img{i}.png")
        storage.atomic_write_bytes(uri, png_bytes(image))
        for noun, (ys, xs) in (("circle", (slice(2, 7), slice(2, 7))), ("square", (slice(9, 14), slice(8, 13)))):
            mask = np.zeros((16, 16), dtype=bool)
            mask[ys, xs] = True
            rows.append(shard_row(f"img{i}", uri, caption, 16, 16, "fp", noun=noun, mask=mask,
                                  token_positions=list(token_positions(caption, noun, clip_tokenizer()))))
    cache = str(tmp_path / "masks")
    commit_shard(cache, "shard-00000", rows_frame(rows))
    config = load_config("tiny", ["models.diffusion=tiny-pixel", f"score.device={device}"])
    result = evaluation.segmentation_miou(config.score, config.sample, config.train.grounding, config.models,
                                          resolve_diffusion_dir(config.models), cache, ["img0", "img1"],
                                          overlays_uri=str(tmp_path / "overlays"), max_overlays=3)
    assert result["images"] == 2 and result["groups"]
    for scores in [*result["groups"].values(), result["overall"]]:
        assert scores["nouns"] == 4
        assert 0.0 <= scores["miou_fixed"] <= scores["miou_best"] <= 100.0
    assert len(result["overlays"]) == 3
    assert all(Path(o["uri"]).is_file() for o in result["overlays"])
