"""The synthetic world: determinism, exact masks, captions, held-out splits, detector accuracy."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from tokencompose_core import synthetic
from tokencompose_core.synthetic import CATEGORIES, DetectorConfig, WorldConfig


def _box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_world_is_deterministic_and_masks_are_exact() -> None:
    config = WorldConfig(train_images=50, seed=3)
    first, second = list(synthetic.train_samples(config)), list(synthetic.train_samples(config))
    assert [s.caption for s in first] == [s.caption for s in second]
    assert all(np.array_equal(a.scene.image(), b.scene.image()) for a, b in zip(first, second))
    other = list(synthetic.train_samples(WorldConfig(train_images=50, seed=4)))
    assert [s.caption for s in first] != [s.caption for s in other]
    for sample in first:
        image = sample.scene.image()
        masks = [obj.mask(config.image_size) for obj in sample.scene.objects]
        assert not np.any(np.sum(masks, axis=0) > 1), "objects overlap"
        for obj, mask in zip(sample.scene.objects, masks):
            assert np.all(image[mask] == obj.category.color)
            assert mask.sum() == obj.category.mask().sum()
        background = ~np.any(masks, axis=0)
        assert np.all(image[background] == synthetic.BACKGROUND)


def test_captions_name_every_object_in_both_forms() -> None:
    assert synthetic.multigen_caption(["ring"]) == "a photo of a ring."
    assert synthetic.multigen_caption(["a", "b", "c"]) == "a photo of a a, a b, and a c."
    samples = list(synthetic.train_samples(WorldConfig(train_images=300, freeform_fraction=0.5)))
    forms = {s.caption.startswith("a photo of") for s in samples}
    assert forms == {True, False}
    for sample in samples:
        for name in sample.scene.names:
            assert f"a {name}" in sample.caption
    # Free-form spatial words are true of the scene.
    rng = random.Random(0)
    scene = synthetic.Scene((synthetic.PlacedObject(CATEGORIES[0], 0, 0),
                             synthetic.PlacedObject(CATEGORIES[1], 0, 10)), 16)
    caption = synthetic.freeform_caption(scene, rng)
    assert caption in {"a circle left of a square on grey", "a square right of a circle on grey",
                       "a circle next to a square on grey", "a square next to a circle on grey"}


def test_heldout_combinations_never_train_and_lead_the_test_prompts() -> None:
    config = WorldConfig(train_images=2000, heldout_combinations={3: 4, 4: 3})
    heldout = synthetic.heldout_combinations(config)
    assert len(heldout) == 7 and len({frozenset(c) for c in heldout}) == 7
    seen = {frozenset(s.scene.names) for s in synthetic.train_samples(config)}
    assert not seen & {frozenset(c) for c in heldout}
    prompts = synthetic.test_prompts(config, [3, 4], per_count=10)
    assert len(prompts) == 20 and [p.prompt_id for p in prompts] == list(range(20))
    assert sum(p.heldout for p in prompts) == 7
    for prompt in prompts:
        assert prompt.text == synthetic.multigen_caption(prompt.categories)
        assert (frozenset(prompt.categories) in {frozenset(c) for c in heldout}) == prompt.heldout
    with pytest.raises(ValueError):
        synthetic.heldout_combinations(WorldConfig(heldout_combinations={5: 6}))


def test_impossible_worlds_are_refused() -> None:
    with pytest.raises(ValueError):
        WorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(RuntimeError):
        synthetic.place_objects(["circle", "square"], 8, random.Random(0))
    five = synthetic.place_objects([c.name for c in CATEGORIES[:5]], 16, random.Random(0))
    assert len(five.objects) == 5


def test_multi_token_names_exist() -> None:
    # The world needs nouns that are several CLIP tokens (hour+glass, bow+tie).
    from tokencompose_core.models import clip_tokenizer

    tokenizer = clip_tokenizer()
    lengths = {c.name: len(tokenizer(c.name, add_special_tokens=False).input_ids) for c in CATEGORIES}
    assert min(lengths.values()) == 1 and max(lengths.values()) >= 2


def test_written_split_is_a_normal_manifest_nouns_table_and_mask_cache(tmp_path) -> None:
    from tokencompose_core import manifest, storage
    from tokencompose_core.mask_cache import MaskCache
    from tokencompose_core.models import clip_tokenizer

    config = WorldConfig(train_images=40, seed=5)
    samples = list(synthetic.train_samples(config))
    tokenizer = clip_tokenizer()
    out = synthetic.write_split(samples, str(tmp_path / "nouns"), str(tmp_path / "masks"), tokenizer, "fp-test",
                                shard_size=16)
    assert out["images"] == 40 and out["nouns"] == sum(len(s.scene.objects) for s in samples)
    rows = manifest.read_manifest(out["manifest_uri"])
    assert list(rows["id"]) == [s.image_id for s in samples]
    assert [c[0] for c in rows["captions"]] == [s.caption for s in samples]
    nouns = storage.read_parquet(out["nouns_uri"])
    assert set(nouns["image_id"]) == set(rows["id"])
    cache = MaskCache(out["cache_uri"])
    assert len(cache.shards) == 3 and len(cache) == 40
    for sample, image_uri in zip(samples, rows["image"]):
        item = cache.get(sample.image_id)
        assert item.image_uri == image_uri and item.caption == sample.caption
        assert np.array_equal(np.asarray(manifest.open_image(image_uri, 10_000)), sample.scene.image())
        for obj in sample.scene.objects:
            i = item.nouns.index(obj.category.name)
            assert np.array_equal(item.masks[i].astype(bool), obj.mask(config.image_size))
            ids = tokenizer(sample.caption).input_ids
            name_ids = tokenizer(obj.category.name, add_special_tokens=False).input_ids
            assert [ids[p] for p in item.token_positions[i]] == name_ids


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a small diffusion model's samples look like: colour shifts, noise, speckles."""
    pixels = image.astype(np.float32) + rng.normal(0, 12, image.shape) + rng.normal(0, 10, (1, 1, 3))
    speckles = rng.random(image.shape[:2]) < 0.03
    palette = np.array([c.color for c in CATEGORIES], dtype=np.float32)
    pixels[speckles] = palette[rng.integers(0, len(palette), speckles.sum())]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def test_detector_accuracy_on_heldout_ground_truth() -> None:
    """Per object: a detection of the right category overlapping its box (IoU >= 0.5);
    a detection matching no object is an error too. Target >= 98%."""
    config = WorldConfig(max_objects=5, seed=11)
    rng = np.random.default_rng(0)
    correct = errors = 0
    for scene in (s.scene for s in synthetic.test_samples(config, 400)):
        found = synthetic.detect(_degrade(scene.image(), rng), DetectorConfig())
        matched: set[int] = set()
        for obj in scene.objects:
            hits = [i for i, d in enumerate(found)
                    if d.category == obj.category.name and _box_iou(d.box, obj.box()) >= 0.5]
            correct += bool(hits)
            errors += not hits
            matched.update(hits)
        errors += len(set(range(len(found))) - matched)
    accuracy = correct / (correct + errors)
    assert accuracy >= 0.98, accuracy
    assert correct >= 1000


def test_detections_frame_schema_and_noise_rejection() -> None:
    scene = synthetic.place_objects(["circle", "bowtie"], 16, random.Random(1))
    noise = np.full((16, 16, 3), 128, dtype=np.uint8)
    noise[::3, ::3] = CATEGORIES[2].color  # isolated speckles of one colour: not an object
    frame = synthetic.detections_frame([(7, 0, scene.image()), (7, 1, noise)])
    assert list(frame.columns) == synthetic.DETECTION_COLUMNS
    assert sorted(frame["category"]) == ["bowtie", "circle"]
    assert set(frame["image_index"]) == {0} and set(frame["prompt_id"]) == {7}
    assert frame["score"].between(0, 1).all() and (frame["score"] > 0.99).all()
    for row in frame.itertuples():
        obj = next(o for o in scene.objects if o.category.name == row.category)
        assert list(row.box) == obj.box()
    assert synthetic.detections_frame([]).empty


@pytest.mark.parametrize("names", list(itertools.combinations([c.name for c in CATEGORIES], 2))[:3])
def test_touching_objects_are_separated_by_colour(names: tuple[str, str]) -> None:
    a, b = (synthetic.CATEGORY_BY_NAME[n] for n in names)
    scene = synthetic.Scene((synthetic.PlacedObject(a, 2, 2), synthetic.PlacedObject(b, 2, 7)), 16)
    assert sorted(d.category for d in synthetic.detect(scene.image())) == sorted(names)


def test_grounded_sam_runs_over_the_written_world(prefect_harness, tmp_path) -> None:
    """The world is an ordinary stage-1 output: the real mask stage (tiny weights) takes it unchanged."""
    from flows.preprocess import masks_flow
    from tokencompose_core.mask_cache import MaskCache
    from tokencompose_core.models import clip_tokenizer

    samples = list(synthetic.train_samples(WorldConfig(train_images=6, seed=3)))
    world = synthetic.write_split(samples, str(tmp_path / "world" / "nouns"), str(tmp_path / "world" / "masks"),
                                  clip_tokenizer(), "fp-test")
    result = masks_flow("tiny", [f"storage.root={tmp_path / 'run'}", "masks.shard_size=4"], world["nouns_uri"])

    exact, grounded = MaskCache(world["cache_uri"]), MaskCache(result["cache_uri"])
    assert sorted(grounded.image_ids()) == sorted(exact.image_ids())
    assert sum(len(grounded.get(s.image_id).nouns) for s in samples) > 0  # some nouns got masks
    for sample in samples:
        ours, truth = grounded.get(sample.image_id), exact.get(sample.image_id)
        assert ours.caption == truth.caption and ours.image_uri == truth.image_uri
        # Random tiny weights find arbitrary boxes; what must hold is the bookkeeping:
        # only the world's nouns, with their token positions, and masks at the image size.
        for noun, positions, mask in zip(ours.nouns, ours.token_positions, ours.masks):
            assert list(positions) == list(truth.token_positions[truth.nouns.index(noun)])
            assert mask.shape == (16, 16)
