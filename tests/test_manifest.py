"""Manifests, safe image opening, the nouns table, and the reference format in and out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tokencompose_core import mask_cache
from tokencompose_core.manifest import (
    ImageError,
    ImagePaths,
    export_reference,
    import_reference,
    open_image,
    read_manifest,
)
from tokencompose_core.config import ModelsConfig
from tokencompose_core.models import clip_tokenizer
from tokencompose_core.stages.nouns import noun_positions
from tokencompose_core.stages.nouns import nouns_table, write_nouns
from tokencompose_core.storage import read_parquet


def _write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def test_read_manifest_resolves_paths_and_ids(tmp_path) -> None:
    uri = _write_jsonl(tmp_path / "m.jsonl", [
        {"image": "img/a.jpg", "captions": "a dog"},
        {"image": "/abs/b.png", "captions": ["a cat", "a kitten"], "id": "42"},
        {"image": "memory://bucket/c.png", "captions": []},
    ])
    frame = read_manifest(uri)
    assert frame["id"].tolist() == ["a", "42", "c"]
    assert frame["image"].tolist() == [str(tmp_path / "img" / "a.jpg"), "/abs/b.png", "memory://bucket/c.png"]
    assert frame["captions"].tolist() == [["a dog"], ["a cat", "a kitten"], []]
    parquet = tmp_path / "m.parquet"
    pd.DataFrame({"image": ["x/a.jpg"], "captions": [["a dog"]]}).to_parquet(parquet)
    assert read_manifest(str(parquet))["image"].tolist() == [str(tmp_path / "x" / "a.jpg")]



@pytest.mark.parametrize(
    ("path", "stays", "relative"),
    [("a.png", True, True), ("sub/../a.png", True, True), ("../a.png", False, False),
     ("sub/../../a.png", False, False), ("..", False, False), ("/abs/a.png", True, False),
     ("memory://other/a.png", True, False)],
)
def test_relative_image_paths_stay_in_the_manifests_folder(path: str, stays: bool, relative: bool) -> None:
    """Also for a manifest behind a URL, whose joined paths are never normalised."""
    assert (ImagePaths().problem("memory://bucket/set", path) is None) == stays
    strict = ImagePaths(allow_absolute=False).problem("memory://bucket/set", path)
    assert (strict is None) == relative
    if strict:
        assert strict.startswith(f"image path not allowed: {path!r} ")

def test_duplicate_ids_are_refused(tmp_path) -> None:
    uri = _write_jsonl(tmp_path / "m.jsonl", [{"image": "a/x.jpg", "captions": "c"}, {"image": "b/x.jpg", "captions": "c"}])
    with pytest.raises(ValueError, match="duplicate image ids"):
        read_manifest(uri)


def test_open_image_reasons(tmp_path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (30, 20), "red").save(good)
    assert open_image(str(good), 10_000).size == (30, 20)
    with pytest.raises(ImageError, match="image too large"):
        open_image(str(good), 599)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="unreadable image"):
        open_image(str(corrupt), 10_000)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="unreadable image"):
        open_image(str(truncated), 10_000)
    with pytest.raises(ImageError, match="file not found"):
        open_image(str(tmp_path / "missing.png"), 10_000)


def test_nouns_table_and_rejects(tmp_path) -> None:
    manifest = pd.DataFrame({
        "id": ["a", "b", "c", "d"],
        "image": ["a.png", "b.png", "c.png", "d.png"],
        "captions": [["A dog chases a frisbee.", "ignored"], ["It is very red."], [], ["a " * 80 + "cat and a dog"]],
    })
    table, rejects = nouns_table(manifest, clip_tokenizer())
    assert table[table.image_id == "a"]["noun"].tolist() == ["dog", "frisbee"]
    assert table[table.image_id == "a"]["token_positions"].map(list).tolist() == [[2], [5]]
    # No nouns, or no usable noun: one noun-less row (the image still trains with the denoising loss).
    assert table[table.image_id == "b"]["noun"].isna().all() and (table.image_id == "b").sum() == 1
    assert table[table.image_id == "d"]["noun"].isna().all()
    assert "c" not in set(table.image_id)
    reasons = {(r.image_id, r.noun if isinstance(r.noun, str) else None): r.reason for r in rejects.itertuples()}
    assert reasons[("b", None)] == "no nouns"
    assert reasons[("c", None)] == "no caption"
    assert reasons[("d", "cat")].startswith("token-span failure: cut off")
    uris = write_nouns(table, rejects, str(tmp_path / "nouns"))
    back = read_parquet(uris["nouns_uri"])
    assert back["token_positions"].map(list).tolist() == table["token_positions"].tolist()


def _reference_fixture(tmp_path) -> tuple[str, np.ndarray]:
    """A tiny copy of the authors' layout: metadata.jsonl, images, seg/<id>/mask_<id>_<noun>.png."""
    dog = np.zeros((24, 32), bool)
    dog[4:12, 6:20] = True
    (tmp_path / "seg" / "001").mkdir(parents=True)
    Image.fromarray(dog.astype(np.uint8) * 255).save(tmp_path / "seg" / "001" / "mask_001_dog.png")
    Image.new("RGB", (32, 24)).save(tmp_path / "001.jpg")
    Image.new("RGB", (40, 30)).save(tmp_path / "002.jpg")
    return _write_jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": "001.jpg", "text": "A dog on a sofa.",
         "attn_list": [["dog", "seg/001/mask_001_dog.png"], ["sofa", None]]},
        {"file_name": "002.jpg", "text": "A view.", "attn_list": [["view", None]]},
        {"file_name": "003.jpg", "text": "A lost image.", "attn_list": [["image", None]]},
    ]), dog


def test_reference_import_and_export_round_trip(tmp_path) -> None:
    metadata, dog = _reference_fixture(tmp_path)
    cache_uri = str(tmp_path / "cache")
    summary = import_reference(metadata, cache_uri, noun_positions(ModelsConfig()), shard_size=2)
    assert summary["shards"] == ["shard-00000", "shard-00001"]
    cache = mask_cache.MaskCache(cache_uri)
    assert cache.image_ids() == ["001", "002"]
    image = cache.get("001")
    assert image.nouns == ["dog"] and image.token_positions == [[2]] and np.array_equal(image.masks[0], dog)
    assert image.boxes == [[6.0, 4.0, 20.0, 12.0]] and (image.height, image.width) == (24, 32)
    assert cache.get("002").nouns == [] and (cache.get("002").height, cache.get("002").width) == (30, 40)
    reasons = cache.rejects().set_index("noun", drop=False)["reason"]
    assert reasons["sofa"] == "noun without detection"
    assert any(reason.startswith("unreadable image") for reason in cache.rejects()["reason"])

    out = tmp_path / "export"
    exported = export_reference(cache_uri, str(out), image_root=str(tmp_path))
    rows = [json.loads(line) for line in open(exported)]
    assert rows[0]["file_name"] == "001.jpg" and rows[0]["text"] == "A dog on a sofa."
    assert rows[0]["attn_list"] == [["dog", "seg/001/mask_001_dog.png"], ["sofa", None]]
    assert np.array_equal(np.asarray(Image.open(out / "seg/001/mask_001_dog.png")) > 0, dog)
    # And back in again: the same cache content.
    again = import_reference(exported, str(tmp_path / "cache2"), noun_positions(ModelsConfig()),
                             image_root=str(tmp_path))
    assert mask_cache.MaskCache(again["cache_uri"]).get("001").nouns == ["dog"]


def test_reference_import_for_an_mmdit_profile_records_joint_columns(tmp_path) -> None:
    """The authors' masks imported for SD 3: the noun's columns in the joint text segment, as stage 1 writes them."""
    from tokencompose_core.config import load_config

    metadata, _ = _reference_fixture(tmp_path)
    models = load_config("tiny-sd3").models
    import_reference(metadata, str(tmp_path / "cache"), noun_positions(models), shard_size=2)
    expected = noun_positions(models)("A dog on a sofa.", "dog")
    assert 2 in expected  # CLIP's "dog" (its start token at 0)
    assert any(column >= 77 for column in expected)  # and T5's, after the 77 CLIP columns
    assert mask_cache.MaskCache(str(tmp_path / "cache")).get("001").token_positions == [list(expected)]
