"""`tokencompose fid-reference`: the paper's FID protocol (N random captions of COCO val or
Flickr30k) on tiny stand-ins, then sampled and scored by the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from helpers import coco_stand_in, stand_in_images
from tokencompose_core import storage
from tokencompose_core.fid_sets import build_fid_set, flickr30k_captions

def test_coco_set_is_a_seeded_draw_of_captions_and_their_images(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    captions, images = coco_stand_in(tmp_path)
    command = ["fid-reference", "--coco-captions", captions, "--images", images, "--count", "6"]
    assert main([*command, "--out", str(tmp_path / "a")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert Path(result["manifest"]) == tmp_path / "a" / "coco-val2017-6.jsonl"
    prompts = Path(result["prompts"]).read_text().splitlines()
    rows = [json.loads(line) for line in Path(result["manifest"]).read_text().splitlines()]
    assert len(prompts) == 6 and result["images"] == len(rows)
    # Each drawn image once, with exactly its drawn captions; newlines in captions are gone.
    assert sorted(c for row in rows for c in row["captions"]) == sorted(prompts)
    assert all(Path(row["image"]).is_file() and row["image"].endswith(f"{int(row['id']):012d}.jpg") for row in rows)
    # The same file and seed draw the same set; another seed another one.
    assert main([*command, "--out", str(tmp_path / "b")]) == 0
    assert main([*command, "--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    capsys.readouterr()
    assert (tmp_path / "b" / "coco-val2017-6.txt").read_text() == "\n".join(prompts) + "\n"
    assert (tmp_path / "c" / "coco-val2017-6.txt").read_text() != "\n".join(prompts) + "\n"


def test_flickr30k_token_and_karpathy_files(tmp_path: Path) -> None:
    names = ["1000092795.jpg", "10002456.jpg"]
    token = tmp_path / "results_20130124.token"
    token.write_text("".join(f"{name}#{k}\tPeople {k} in picture {name}.\n" for name in names for k in range(5)))
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": name, "split": split, "sentences": [{"raw": f"People {k} in picture {name}."} for k in range(5)]}
        for name, split in zip(names, ["train", "test"])]}))
    assert len(flickr30k_captions(str(token))) == 10
    assert {c.file_name for c in flickr30k_captions(str(karpathy), "test")} == {"10002456.jpg"}
    stand_in_images(tmp_path / "flickr30k-images", names)
    result = build_fid_set("flickr30k", str(karpathy), str(tmp_path / "flickr30k-images"), str(tmp_path / "out"),
                           count=3, split="test")
    assert Path(result["manifest"]).name == "flickr30k-test-3.jsonl" and result["images"] == 1


@pytest.mark.parametrize("command, message", [
    (["--count", "99"], "asked for 99 captions but the file has 12"),
    (["--count", "12", "--images", "/nonexistent"], "4 of the 4 drawn images are not in /nonexistent"),
    (["--split", "test"], "--split is for Karpathy's dataset_flickr30k.json"),
])
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
                               message: str) -> None:
    captions, images = coco_stand_in(tmp_path)
    base = ["fid-reference", "--coco-captions", captions, "--images", images, "--out", str(tmp_path / "out")]
    assert main([*base, *command]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_sample_and_score_fid_against_the_set(prefect_harness, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The documented three commands, on the tiny profile."""
    captions, images = coco_stand_in(tmp_path)
    assert main(["fid-reference", "--coco-captions", captions, "--images", images, "--out", str(tmp_path / "fid"),
                 "--count", "4"]) == 0
    reference = json.loads(capsys.readouterr().out)
    settings = [f"storage.root={tmp_path / 'runs'}", "sample.num_inference_steps=2", "score.heldout_images=0",
                "score.report_overlays=0", "score.clip=false"]
    assert main(["sample", "-p", "tiny", f"sample.prompts={reference['prompts']}", "sample.images_per_prompt=1",
                 "sample.max_prompts=null", *settings]) == 0
    samples = json.loads(capsys.readouterr().out)["output_uri"]
    assert Path(samples).name.startswith("base-coco-val2017-4-")
    assert main(["score", "-p", "tiny", "--input", samples, f"score.fid_reference={reference['manifest']}",
                 *settings]) == 0
    (scores,) = json.loads(capsys.readouterr().out)["scores"]
    fid = storage.read_json(storage.join(scores, "fid.json"))
    assert np.isfinite(fid["fid"]) and fid["reference_images"] == reference["images"]
    # Captions name no objects: nothing to detect, and no MultiGen number is reported for them.
    assert storage.read_json(storage.join(scores, "multigen.json"))["reported_ks"] == {"coco-val2017-4": []}
