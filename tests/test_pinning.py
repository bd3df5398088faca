"""Pinned regeneration: stage 1's image allowlist, the new switches in the stage keys, OWLv2's processor."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tokencompose_core.config import ConfigError, load_config
from tokencompose_core.stages.nouns import build_nouns
from tokencompose_core.pinning import (
    SHIPPED_DIR,
    allowed_keys,
    allowlist_identity,
    image_key,
    restrict_manifest,
    shipped_lists,
)
from tokencompose_core.stages import stage_fingerprint, stage_settings
from tokencompose_core.storage import read_parquet


def test_the_authors_coco_ids_are_shipped_as_package_data() -> None:
    assert "tokencompose-4526" in shipped_lists()
    keys = allowed_keys("tokencompose-4526")
    assert len(keys) == 4526  # every image of the authors' released training data, none twice
    assert {"142", "370"} <= keys  # the first two of their metadata, as COCO ids
    lines = (SHIPPED_DIR / "tokencompose-4526.txt").read_text(encoding="utf-8").splitlines()
    ids = [line for line in lines if not line.startswith("#")]
    assert ids == sorted(ids) and all(len(i) == 12 and i.isdigit() for i in ids)  # COCO train2017 file stems


@pytest.mark.parametrize("name", ["000000000142.jpg", "000000000142", "142", 142, "/coco/train2017/000000000142.JPG"])
def test_coco_file_names_and_ids_are_one_image(name) -> None:
    assert image_key(name) == "142"


def test_image_key_leaves_other_names_alone() -> None:
    assert image_key("dog.v2") == "dog.v2" and image_key("a/b/cat.png") == "cat" and image_key("0") == "0"
    assert image_key("x²") == "x²" and image_key("²") == "²"


def _manifest(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "image": [f"/coco/{i}.jpg" for i in ids], "captions": [["A dog."]] * len(ids),
                         "path_problem": [None] * len(ids)})


def test_rows_outside_the_allowlist_become_rejects() -> None:
    manifest = _manifest(["000000000142", "000000000009", "dog"])
    kept, rejects = restrict_manifest(manifest, ["142", "dog"])
    assert kept["id"].tolist() == ["000000000142", "dog"]
    assert [(r["image_id"], r["noun"], r["stage"]) for r in rejects] == [("000000000009", None, "nouns")]
    assert rejects[0]["reason"] == "image not in the allowlist nouns.image_ids (a list of 2 ids)"
    same, none = restrict_manifest(manifest, None)
    assert same is manifest and none == []


def test_an_allowlist_file_matches_by_image_file_name(tmp_path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("# my subset\n000000000009.jpg\n\n")
    manifest = _manifest(["a", "b"]).assign(image=["/coco/000000000009.jpg", "/coco/000000000142.jpg"])
    kept, rejects = restrict_manifest(manifest, str(ids))
    assert kept["id"].tolist() == ["a"] and [r["image_id"] for r in rejects] == ["b"]
    assert rejects[0]["reason"] == f"image not in the allowlist nouns.image_ids ({ids})"
    with pytest.raises(ValueError, match="neither a shipped list \\(tokencompose-4526\\) nor a file"):
        allowed_keys("tokencompose-9999")


def test_stage_one_writes_allowlist_rejects(tmp_path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"image": "000000000142.jpg", "captions": "A dog chases a frisbee."},
            {"image": "000000000009.jpg", "captions": "A cat on a sofa."}]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    config = load_config("tiny", ["nouns.image_ids=tokencompose-4526"])
    summary = build_nouns(str(manifest), str(tmp_path / "nouns"), config.nouns, config.models, 10**6)
    assert set(read_parquet(summary["nouns_uri"])["image_id"]) == {"000000000142"}
    rejects = read_parquet(summary["rejects_uri"])
    assert rejects[["image_id", "stage", "reason"]].values.tolist() == [
        ["000000000009", "nouns", "image not in the allowlist nouns.image_ids (tokencompose-4526)"]]
    assert summary["images"] == 1 and summary["rejects"] == 1


def test_paper_profiles_regenerate_from_the_authors_images_only() -> None:
    for profile in ("sd14", "sd21"):
        assert load_config(profile).nouns.image_ids == "tokencompose-4526"
    assert load_config("tiny").nouns.image_ids is None
    with pytest.raises(ConfigError):
        load_config("tiny", ["nouns.image_ids={a: 1}"])


def test_the_allowlist_counts_in_stage_one_by_content(tmp_path) -> None:
    default = load_config("tiny")
    assert stage_settings(default, "nouns")["nouns"]["image_ids"] is None  # every image
    pinned = load_config("tiny", ["nouns.image_ids=tokencompose-4526"])
    assert stage_settings(pinned, "nouns")["nouns"]["image_ids"] == allowlist_identity("tokencompose-4526")
    assert stage_fingerprint(pinned, "nouns") != stage_fingerprint(default, "nouns")
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(sorted(allowed_keys("tokencompose-4526"), reverse=True)))
    as_file = load_config("tiny", [f"nouns.image_ids={ids}"])
    assert stage_fingerprint(as_file, "nouns") == stage_fingerprint(pinned, "nouns")  # the same images


@pytest.mark.parametrize("override", ["masks.detector_size_rounding=truncate", "masks.detector_batching=per_image",
                                      "masks.clamp_boxes=false", "masks.keep_ungrounded_images=false"])
def test_mask_switches_count_in_stage_two(override: str) -> None:
    default, changed = load_config("tiny"), load_config("tiny", [override])
    assert stage_fingerprint(changed, "nouns") == stage_fingerprint(default, "nouns")
    assert stage_fingerprint(changed, "masks") != stage_fingerprint(default, "masks")


def test_paper_profiles_score_with_the_slow_owlv2_processor() -> None:
    from tokencompose_core.models import load_owlv2

    assert [load_config(p).score.owlv2_backend for p in ("sd14", "sd21", "tiny")] == ["pil", "pil", "torchvision"]
    default, pinned = load_config("tiny"), load_config("tiny", ["score.owlv2_backend=pil"])
    assert stage_fingerprint(pinned, "score") != stage_fingerprint(default, "score")
    assert stage_fingerprint(pinned, "sample") == stage_fingerprint(default, "sample")
    for backend, processor in (("torchvision", "Owlv2ImageProcessor"), ("pil", "Owlv2ImageProcessorPil")):
        assert type(load_owlv2(default.models, backend=backend)[1].image_processor).__name__ == processor


def test_scoring_passes_the_backend_to_the_detector(monkeypatch) -> None:
    from tokencompose_core.stages import score as scoring

    seen = {}
    monkeypatch.setattr(scoring, "detect_owlv2", lambda *args, **kwargs: seen.update(kwargs) or "uri")
    config = load_config("tiny", ["score.owlv2_backend=pil"])
    scoring.DETECTORS["owlv2"]("index", [], config.models, config.score, "out", 8)
    assert seen["backend"] == "pil"


def test_paper_profiles_pick_the_reference_grounded_sam_choices() -> None:
    for profile in ("sd14", "sd21"):
        masks = load_config(profile).masks
        assert (masks.detector_size_rounding, masks.detector_batching) == ("truncate", "per_image")
        assert not masks.clamp_boxes and not masks.keep_ungrounded_images
    masks = load_config("tiny").masks
    assert (masks.detector_size_rounding, masks.detector_batching, masks.clamp_boxes,
            masks.keep_ungrounded_images) == ("round", "batched", True, True)
