"""Stages 1-2 as Prefect flows: manifest -> nouns -> mask cache, bad rows, kill and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

import tokencompose_core.grounding as grounding
from flows.preprocess import masks_flow, nouns_flow, preprocess_flow
from tokencompose_core import mask_cache, outputs
from tokencompose_core.config import load_config
from tokencompose_core.stages import stage_fingerprint

PHOTOS = {
    "astronaut": ("astronaut", "An astronaut in a space suit holding a flag."),
    "cat": ("chelsea", "A cat sitting next to a wall."),
    "coffee": ("coffee", "A cup of coffee on a saucer with a spoon."),
    "rocket": ("rocket", "A rocket on a launch pad under a blue sky."),
}


def _manifest(tmp_path) -> str:
    rows = []
    for image_id, (name, caption) in PHOTOS.items():
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((96, 72)).save(tmp_path / f"{image_id}.png")
        rows.append({"image": f"{image_id}.png", "captions": [caption, "an unused second caption"]})
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows.append({"image": "broken.jpg", "captions": "A dog on a bed."})
    rows.append({"image": "nowhere.jpg", "captions": "A horse in a field."})
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def _overrides(tmp_path) -> list[str]:
    return [f"storage.root={tmp_path / 'run'}", "masks.shard_size=2", "masks.max_boxes=4", "masks.batch_size=2"]


def test_preprocess_flow_end_to_end(prefect_harness, tmp_path) -> None:
    result = preprocess_flow("tiny", _overrides(tmp_path), _manifest(tmp_path))
    assert result["nouns"]["images"] == 6
    masks = result["masks"]
    assert masks["shards"] == 3 and masks["shards_skipped"] == 0
    cache = mask_cache.MaskCache(masks["cache_uri"])
    assert cache.image_ids() == sorted(PHOTOS)  # broken and missing images are rejected
    for image_id in cache.image_ids():
        image = cache.get(image_id, size=(16, 16))
        assert (image.height, image.width) == (72, 96) and image.masks.shape == (len(image.nouns), 16, 16)
        assert all(positions for positions in image.token_positions)
    reasons = cache.rejects().set_index("image_id")["reason"]
    assert reasons["broken"].startswith("unreadable image") and reasons["nowhere"].startswith("unreadable image")
    assert masks["images"] == 4 and masks["rows"] >= 4


def test_kill_and_resume(prefect_harness, tmp_path, monkeypatch) -> None:
    overrides = _overrides(tmp_path)
    nouns = nouns_flow("tiny", overrides, _manifest(tmp_path))
    real = grounding.ground_shard
    grounded: list[list[str]] = []

    def failing_on_shard_two(rows, *args, **kwargs):
        if "coffee" in set(rows["image_id"]):  # the second shard: coffee, rocket
            raise RuntimeError("simulated crash in shard 2")
        grounded.append(sorted(set(rows["image_id"])))
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(grounding, "ground_shard", failing_on_shard_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        masks_flow("tiny", overrides, nouns["nouns_uri"])
    config = load_config("tiny", overrides)
    cache_uri = outputs.output_folder(config, "masks", "masks", stage_fingerprint(config, "masks"))
    assert "shard-00000" in mask_cache.completed_shards(cache_uri)
    assert "shard-00001" not in mask_cache.completed_shards(cache_uri)
    assert not (Path(cache_uri) / "shards" / "shard-00001.parquet").exists()  # no half shard

    def counting(rows, *args, **kwargs):
        grounded.append(sorted(set(rows["image_id"])))
        return real(rows, *args, **kwargs)

    grounded.clear()
    monkeypatch.setattr(grounding, "ground_shard", counting)
    resumed = masks_flow("tiny", overrides, nouns["nouns_uri"])
    assert grounded == [["coffee", "rocket"]]  # shards 1 and 3 are not redone
    assert set(mask_cache.completed_shards(cache_uri)) == {"shard-00000", "shard-00001", "shard-00002"}
    assert len(mask_cache.MaskCache(cache_uri)) == 4 and resumed["shards"] == 3

    # A changed threshold regrounds every shard (new fingerprint), nothing is reused.
    grounded.clear()
    masks_flow("tiny", overrides + ["masks.box_threshold=0.3"], nouns["nouns_uri"])
    assert len(grounded) == 3


def test_deleted_cache_is_rebuilt_not_served_from_the_prefect_cache(prefect_harness, tmp_path, monkeypatch) -> None:
    overrides = _overrides(tmp_path) + ["masks.shard_size=8"]
    nouns = nouns_flow("tiny", overrides, _manifest(tmp_path))
    first = masks_flow("tiny", overrides, nouns["nouns_uri"])
    calls = []
    real = grounding.ground_shard
    monkeypatch.setattr(grounding, "ground_shard", lambda rows, *a, **k: calls.append(1) or real(rows, *a, **k))
    masks_flow("tiny", overrides, nouns["nouns_uri"])
    assert calls == []  # all cached
    shutil.rmtree(first["cache_uri"])
    again = masks_flow("tiny", overrides, nouns["nouns_uri"])
    assert calls == [1] and len(mask_cache.MaskCache(again["cache_uri"])) == 4


def test_masks_flow_imports_the_reference_format(prefect_harness, tmp_path) -> None:
    import numpy as np

    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 8:20] = 255
    (tmp_path / "seg").mkdir()
    Image.fromarray(mask).save(tmp_path / "seg" / "mask_7_dog.png")
    Image.new("RGB", (32, 24)).save(tmp_path / "7.jpg")
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "7.jpg", "text": "A dog on a mat.",
                                    "attn_list": [["dog", "seg/mask_7_dog.png"], ["mat", None]]}) + "\n")
    result = masks_flow("tiny", [f"storage.root={tmp_path / 'run'}"], str(metadata))
    cache = mask_cache.MaskCache(result["cache_uri"])
    assert result["images"] == 1 and cache.image_ids() == ["7"]
    image = cache.get("7")
    assert image.nouns == ["dog"] and image.masks[0].sum() == 120 and image.image_uri == str(tmp_path / "7.jpg")


def test_a_reference_import_reads_only_the_paths_a_manifest_may_use(prefect_harness, tmp_path) -> None:
    """Image and mask paths of the authors' metadata.jsonl obey the manifest's rules: none leaves
    the metadata's folder, and with storage.allowed_roots set none lies outside them."""
    import numpy as np

    from flows.cli import main

    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "seg").mkdir(parents=True)
    outside.mkdir()
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 8:20] = 255
    for folder in (data / "seg", outside):
        Image.fromarray(mask).save(folder / "mask_dog.png")
    for image in (data / "7.jpg", data / "8.jpg", outside / "9.jpg"):
        Image.new("RGB", (32, 24)).save(image)
    rows = [{"file_name": "7.jpg", "text": "A dog on a mat.", "attn_list": [["dog", "seg/mask_dog.png"]]},
            {"file_name": "../outside/9.jpg", "text": "A dog.", "attn_list": [["dog", "seg/mask_dog.png"]]},
            {"file_name": "8.jpg", "text": "A dog.", "attn_list": [["dog", "../outside/mask_dog.png"]]},
            {"file_name": str(outside / "9.jpg"), "text": "A dog.", "attn_list": [["dog", "seg/mask_dog.png"]]}]
    metadata = data / "metadata.jsonl"
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    root = data / "run"
    assert main(["masks", "-p", "tiny", f"storage.root={root}", f"storage.allowed_roots=['{data}']",
                 "--input", str(metadata)]) == 0
    (cache_uri,) = [str(path) for path in (root / "masks").iterdir()]
    cache = mask_cache.MaskCache(cache_uri)
    rejects = cache.rejects()
    reasons = " | ".join(rejects["reason"].tolist())
    assert "leaves the manifest's folder" in reasons and "outside the configured storage roots" in reasons
    assert "mask image path not allowed" in reasons and len(rejects) == 3
    # The allowed image with an allowed mask is imported; the one whose mask was refused keeps no noun.
    assert cache.image_ids() == ["7", "8"] and cache.get("7").nouns == ["dog"] and cache.get("8").nouns == []
