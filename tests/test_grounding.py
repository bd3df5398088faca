"""Grounded-SAM: phrase matching, box and mask plumbing, shards with bad rows, tiny models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image

from tokencompose_core import mask_cache
from tokencompose_core.config import load_config
from tokencompose_core.grounding import (
    UNGROUNDED_REASON,
    Detection,
    GroundedSam,
    Grounding,
    _cxcywh_to_pixels,
    detection_caption,
    detector_batches,
    detector_input_size,
    ground_shard,
    match_phrase,
    match_phrase_reference,
    noun_token_spans,
    run_mask_shard,
    shard_inputs_digest,
    union_by_noun,
    union_by_phrase,
)


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("wine glass", "wine glass"),  # exact
        ("Wine Glass", "wine glass"),  # case
        ("t - shirt", "T-shirt"),  # BERT's hyphen spacing
        ("glass", "wine glass"),  # phrase inside a noun
        ("dog wine glass", "wine glass"),  # ran over two nouns: the higher-scoring one
        ("bicycle", None),
        ("", None),
    ],
)
def test_match_phrase(phrase: str, expected: str | None) -> None:
    nouns = ["dog", "wine glass", "T-shirt"]
    assert match_phrase(phrase, nouns, noun_scores=[0.3, 0.6, 0.1]) == expected


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("wine glass", "wine glass"),  # exact
        ("smart car", "Smart Car"),  # no case rule fits a mixed-case noun: the substring rule does
        ("t - shirt", "t-shirt"),  # " - " closed up
        ("glass", "wine glass"),  # a word of the noun
        ("dog wine glass", "dog"),  # ran over two nouns: the first in word-list order
        ("catalog book", "cat"),  # the substring rule overrides "catalog", the word match
        ("[CLS] dog", "dog"),  # decoded special tokens stay in the phrase
        ("", "dog"),  # an empty phrase is inside every noun: the first one
        ("bicycle", None),
    ],
)
def test_match_phrase_reference(phrase: str, expected: str | None) -> None:
    nouns = ["dog", "wine glass", "t-shirt", "Smart Car", "cat", "catalog"]
    assert match_phrase_reference(phrase, nouns) == expected


def test_reference_union_keeps_the_last_phrase_of_a_noun() -> None:
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :5], masks[1, 5:], masks[2, :, :2] = True, True, True
    detections = [Detection("dog", [0, 0, 5, 5], 0.4, "dog"), Detection("dog", [1, 1, 2, 2], 0.9, "dog ."),
                  Detection("dog", [3, 4, 8, 9], 0.7, "dog")]
    found = union_by_phrase(detections, masks)
    assert [g.noun for g in found] == ["dog"]
    assert np.array_equal(found[0].mask, masks[1]) and found[0].score == 0.9  # "dog ." came last
    assert np.array_equal(union_by_noun(detections, masks)[0].mask, masks.any(0))


def test_tiny_sam_hq_with_reference_matching(tmp_path) -> None:
    config = load_config("tiny", ["masks.max_boxes=8", "models.sam.variant=sam_hq", "masks.phrase_matching=reference"])
    grounder = GroundedSam.from_config(config.models, config.masks)
    assert type(grounder.predictor.model.mask_decoder).__name__ == "MaskDecoderHQ"
    images = [Image.fromarray(skimage.data.chelsea()), _shapes_photo(tmp_path)]
    nouns = [["cat"], ["square", "disk"]]
    detections = grounder.detect(images, nouns)
    assert any(detections)
    for image, image_nouns, found, grounded in zip(images, nouns, detections, grounder(images, nouns)):
        assert all(d.noun == match_phrase_reference(d.phrase, image_nouns) for d in found)
        assert {g.noun for g in grounded} == {d.noun for d in found}
        assert all(g.mask.shape == (image.height, image.width) for g in grounded)


@pytest.fixture(scope="module")
def tiny_grounder() -> GroundedSam:
    config = load_config("tiny", ["masks.max_boxes=8"])
    return GroundedSam.from_config(config.models, config.masks)


def test_noun_token_spans_follow_the_detector_tokenizer(tiny_grounder: GroundedSam) -> None:
    tokenizer = tiny_grounder.dino.tokenizer
    nouns = ["Wine glass", "cat"]
    caption = detection_caption(nouns)
    assert caption == "wine glass . cat ."
    ids = tokenizer(caption)["input_ids"]
    spans = noun_token_spans(caption, nouns, tokenizer, max_len=len(ids))
    assert [tokenizer.decode([ids[i] for i in span]) for span in spans] == ["wine glass", "cat"]
    assert noun_token_spans(caption, nouns, tokenizer, max_len=3)[1] == range(3, 3)  # past the text limit


def test_boxes_to_pixels_and_union() -> None:
    boxes = _cxcywh_to_pixels(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.4, 0.4]]), height=100, width=200)
    expected = [[50.0, 25.0, 150.0, 75.0], [140.0, 0.0, 200.0, 30.0]]  # the second clipped to the image
    assert boxes.flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-4)
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :5], masks[1, 5:], masks[2, :, :2] = True, True, True
    found = union_by_noun([Detection("dog", [0, 0, 5, 5], 0.4), Detection("cat", [1, 1, 2, 2], 0.9),
                           Detection("dog", [3, 4, 8, 9], 0.7)], masks)
    assert [g.noun for g in found] == ["dog", "cat"]
    assert found[0].box == [0.0, 0.0, 8.0, 9.0] and found[0].score == 0.7
    assert np.array_equal(found[0].mask, masks[0] | masks[2])


def _shapes_image(path) -> dict[str, np.ndarray]:
    """A synthetic image with a known square and disk; returns their exact masks."""
    yy, xx = np.mgrid[:60, :80]
    square = (yy >= 10) & (yy < 30) & (xx >= 5) & (xx < 25)
    disk = (yy - 40) ** 2 + (xx - 55) ** 2 <= 12**2
    pixels = np.full((60, 80, 3), 255, np.uint8)
    pixels[square], pixels[disk] = (200, 0, 0), (0, 0, 200)
    Image.fromarray(pixels).save(path)
    return {"square": square, "disk": disk}


class ShapeGrounder:
    """Stands in for Grounded-SAM where the right answer is known: the exact shapes."""

    def __init__(self, truth: dict[str, dict[str, np.ndarray]]) -> None:
        self.truth, self.calls = truth, []

    def __call__(self, images, nouns):
        self.calls.append(len(images))
        out = []
        for image, image_nouns in zip(images, nouns):
            known = self.truth[image.size]
            out.append([Grounding(n, known[n], mask_cache.mask_box(known[n]), 0.9) for n in image_nouns if n in known])
        return out


def _nouns_rows(items) -> pd.DataFrame:
    rows = [{"image_id": i, "image_uri": uri, "caption": f"a {' and a '.join(nouns) or 'view'}",
             "noun": noun, "token_positions": [2 + 3 * k] if noun else []}
            for i, uri, nouns in items for k, noun in enumerate(nouns or [None])]
    return pd.DataFrame(rows)


def test_bad_rows_go_to_rejects_and_the_rest_is_written(tmp_path) -> None:
    truth = _shapes_image(tmp_path / "shapes.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not an image")
    Image.new("RGB", (300, 300)).save(tmp_path / "huge.png")
    nouns = _nouns_rows([
        ("shapes", str(tmp_path / "shapes.png"), ["square", "disk", "unicorn"]),
        ("corrupt", str(tmp_path / "corrupt.jpg"), ["dog"]),
        ("missing", str(tmp_path / "missing.jpg"), ["dog"]),
        ("huge", str(tmp_path / "huge.png"), ["dog"]),
        ("plain", str(tmp_path / "shapes.png"), []),
    ])
    grounder = ShapeGrounder({(80, 60): truth})
    rows, rejects = ground_shard(nouns, grounder, "fp", batch_size=4, max_image_pixels=50_000)
    assert grounder.calls == [1]  # only the readable image with nouns reaches the models
    cache = str(tmp_path / "cache")
    mask_cache.commit_shard(cache, "shard-00000", rows, rejects)
    reader = mask_cache.MaskCache(cache)
    assert reader.image_ids() == ["plain", "shapes"]
    shapes = reader.get("shapes")
    assert shapes.nouns == ["square", "disk"] and shapes.token_positions == [[2], [5]]
    assert np.array_equal(shapes.masks[0], truth["square"]) and np.array_equal(shapes.masks[1], truth["disk"])
    assert shapes.boxes[0] == [5.0, 10.0, 25.0, 30.0]
    assert reader.get("plain").nouns == []
    reasons = dict(zip(rejects["image_id"] + ":" + rejects["noun"].fillna(""), rejects["reason"]))
    assert reasons["shapes:unicorn"] == "noun without detection"
    assert reasons["corrupt:"].startswith("unreadable image")
    assert reasons["missing:"].startswith("unreadable image: file not found")
    assert reasons["huge:"].startswith("image too large")


def test_completed_shard_is_skipped_without_loading_models(tmp_path) -> None:
    truth = _shapes_image(tmp_path / "shapes.png")
    nouns = _nouns_rows([("shapes", str(tmp_path / "shapes.png"), ["square"])])
    cache = str(tmp_path / "cache")
    loads = []

    def factory():
        loads.append(1)
        return ShapeGrounder({(80, 60): truth})

    first = run_mask_shard(nouns, cache, "shard-00000", factory, "fp", 4, 10**6)
    again = run_mask_shard(nouns, cache, "shard-00000", factory, "fp", 4, 10**6)
    assert not first["skipped"] and again["skipped"] and len(loads) == 1
    # Throughput and place are those of the run that ground; a skipped shard ran nothing.
    assert first["images_per_s"] > 0 and first["device"] == "cpu"
    assert again["images_per_s"] is None and again["device"] is None
    changed = run_mask_shard(nouns, cache, "shard-00000", factory, "fp2", 4, 10**6)  # new thresholds
    assert not changed["skipped"] and len(loads) == 2
    assert shard_inputs_digest(nouns) != shard_inputs_digest(nouns.assign(caption="another"))


def test_tiny_grounded_sam_on_real_photos(tiny_grounder: GroundedSam, tmp_path) -> None:
    images = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.chelsea()),
              _shapes_photo(tmp_path)]
    nouns = [["astronaut", "flag"], ["cat"], ["square", "disk"]]
    detections = tiny_grounder.detect(images, nouns)
    assert any(detections)  # seeded random weights: some queries pass the thresholds
    for image, image_nouns, found in zip(images, nouns, detections):
        assert len(found) <= 8
        for detection in found:
            assert detection.noun in image_nouns and 0.25 < detection.score <= 1
            x0, y0, x1, y1 = detection.box
            assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
    groundings = tiny_grounder(images, nouns)
    assert [{g.noun for g in found} for found in groundings] == [{d.noun for d in found} for found in detections]
    for image, image_nouns, found in zip(images, nouns, groundings):
        assert len({g.noun for g in found}) == len(found)
        for grounding in found:
            assert grounding.noun in image_nouns
            assert grounding.mask.shape == (image.height, image.width) and grounding.mask.dtype == bool


def _shapes_photo(tmp_path) -> Image.Image:
    _shapes_image(tmp_path / "s.png")
    return Image.open(tmp_path / "s.png").convert("RGB")


def test_an_image_the_models_fail_on_is_rejected_alone(tmp_path) -> None:
    truth = _shapes_image(tmp_path / "shapes.png")
    Image.new("RGB", (50, 40)).save(tmp_path / "odd.png")
    grounder = ShapeGrounder({(80, 60): truth})
    known = grounder.__call__

    def fragile(images, nouns):
        if any(image.size == (50, 40) for image in images):
            raise ValueError("the detector cannot take this image")
        return known(images, nouns)

    nouns = _nouns_rows([("shapes", str(tmp_path / "shapes.png"), ["square"]),
                         ("odd", str(tmp_path / "odd.png"), ["square"])])
    rows, rejects = ground_shard(nouns, fragile, "fp", batch_size=2, max_image_pixels=10**6)
    assert rows["image_id"].tolist() == ["shapes"] and rows["noun"].tolist() == ["square"]
    assert rejects["image_id"].tolist() == ["odd"]
    assert rejects["reason"].iloc[0] == "grounding failed: ValueError: the detector cannot take this image"

    def out_of_memory(images, nouns):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # not the image's fault: the task retries with a smaller batch
        ground_shard(nouns, out_of_memory, "fp", batch_size=2, max_image_pixels=10**6)


# ----------------------------------------------------------------- the reference's deterministic choices


@pytest.mark.parametrize("size, rounded, truncated", [
    ((640, 480), (800, 1067), (800, 1066)),  # COCO's usual size: 1066.67 px wide
    ((480, 640), (1067, 800), (1066, 800)),
    ((1000, 400), (533, 1333), (533, 1332)),  # long side capped at 1333
    ((800, 800), (800, 800), (800, 800)),
    ((1000, 401), (535, 1333), (535, 1334)),  # capped: the reference rounds the short side, then truncates
])
def test_detector_input_size_rounded_or_truncated(size, rounded, truncated) -> None:
    assert detector_input_size(*size, 800) == rounded
    assert detector_input_size(*size, 800, "truncate") == truncated


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 400), (1000, 401), (333, 500), (612, 612), (7, 5)])
def test_truncated_size_is_groundingdinos_own_resize(size) -> None:
    from groundingdino.datasets.transforms import RandomResize

    resized, _ = RandomResize([800], max_size=1333)(Image.new("RGB", size))
    assert detector_input_size(*size, 800, "truncate") == (resized.height, resized.width)


def test_boxes_are_left_unclipped_on_request() -> None:
    boxes = torch.tensor([[0.9, 0.1, 0.4, 0.4]])
    assert _cxcywh_to_pixels(boxes, 100, 200, clamp=False).flatten().tolist() == pytest.approx([140, -10, 220, 30])
    assert _cxcywh_to_pixels(boxes, 100, 200).flatten().tolist() == pytest.approx([140, 0, 200, 30])


def test_detector_batches() -> None:
    assert detector_batches(3, "batched") == [range(3)] and detector_batches(0, "batched") == []
    assert detector_batches(3, "per_image") == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="unknown detector batching"):
        detector_batches(3, "sometimes")


def test_per_image_detection_runs_one_forward_per_image(tmp_path) -> None:
    config = load_config("tiny", ["masks.max_boxes=8", "masks.detector_batching=per_image",
                                  "masks.detector_size_rounding=truncate", "masks.clamp_boxes=false"])
    grounder = GroundedSam.from_config(config.models, config.masks)
    assert (grounder.detector_size_rounding, grounder.clamp_boxes) == ("truncate", False)
    forward, batches = grounder.dino.forward, []

    def recording(samples, captions):
        batches.append(len(captions))
        return forward(samples, captions=captions)

    grounder.dino.forward = recording
    images = [Image.fromarray(skimage.data.chelsea()), _shapes_photo(tmp_path)]
    nouns = [["cat"], ["square", "disk"]]
    together = grounder.detect(images, nouns)
    assert batches == [1, 1]
    alone = [grounder.detect([image], [image_nouns])[0] for image, image_nouns in zip(images, nouns)]
    assert [[(d.noun, d.box) for d in found] for found in together] == [[(d.noun, d.box) for d in found]
                                                                          for found in alone]


def test_images_without_a_grounded_noun_are_left_out_on_request(tmp_path) -> None:
    truth = _shapes_image(tmp_path / "shapes.png")
    nouns = _nouns_rows([
        ("shapes", str(tmp_path / "shapes.png"), ["square"]),
        ("missed", str(tmp_path / "shapes.png"), ["unicorn"]),  # a noun, never detected
        ("plain", str(tmp_path / "shapes.png"), []),  # no noun from stage 1
    ])
    grounder = ShapeGrounder({(80, 60): truth})
    kept, _ = ground_shard(nouns, grounder, "fp", batch_size=4, max_image_pixels=10**6)
    assert set(kept["image_id"]) == {"shapes", "missed", "plain"}  # ours: they train with the denoising loss
    grounder.keep_ungrounded_images = False  # GroundedSam takes it from masks.keep_ungrounded_images
    rows, rejects = ground_shard(nouns, grounder, "fp", batch_size=4, max_image_pixels=10**6)
    assert rows["image_id"].tolist() == ["shapes"]
    reasons = rejects.groupby("image_id")["reason"].apply(list).to_dict()
    assert reasons == {"missed": ["noun without detection", UNGROUNDED_REASON], "plain": [UNGROUNDED_REASON]}
