"""Prompt sources, per-image seeding, resume and sharding of the sampler (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import sample_run
from tokencompose_core import storage
from tokencompose_core.config import load_config
from tokencompose_core.sampling import (
    INDEX_COLUMNS,
    Prompt,
    image_seed,
    load_prompts,
    merge_shards,
)

STEPS = ["sample.num_inference_steps=3", "sample.guidance_scale=3.0", "sample.scheduler=ddim"]


# ----------------------------------------------------------------------------- prompts


def test_multigen_sets_from_package_data() -> None:
    coco = load_prompts("multigen:coco")
    assert len(coco) == 1000
    assert coco[1] == Prompt(1, "a photo of a wine glass, a skateboard, a refrigerator, a boat, and a vase.",
                             ("wine glass", "skateboard", "refrigerator", "boat", "vase"))
    ade = load_prompts("multigen:ade20k", max_prompts=3)
    assert len(ade) == 3 and all(len(p.categories) == 5 for p in ade)
    with pytest.raises(ValueError, match="unknown MultiGen set"):
        load_prompts("multigen:lvis")


def test_multigen_package_copy_matches_shared(shared_dir: Path) -> None:
    shared = json.loads((shared_dir / "data/multigen/coco_obj_comp_5_1k.json").read_text())
    assert [p.text for p in load_prompts("multigen:coco")] == [r["text"] for r in shared]


def test_text_json_and_manifest_sources(tmp_path: Path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("a red cube\n\n  a blue ball  \n")
    assert load_prompts(str(text)) == [Prompt(0, "a red cube"), Prompt(1, "a blue ball")]

    multigen = tmp_path / "two.json"
    multigen.write_text(json.dumps([{"unique_id": 7, "obj_1_attributes": ["cat"], "obj_2_attributes": ["dog"],
                                     "text": "a cat and a dog"}]))
    assert load_prompts(str(multigen)) == [Prompt(7, "a cat and a dog", ("cat", "dog"))]

    jsonl = tmp_path / "manifest.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "image": f"{i}.png", "captions": [f"caption {i}", "other"]})
                               for i in range(3)))
    assert [p.text for p in load_prompts(str(jsonl), max_prompts=2)] == ["caption 0", "caption 1"]

    parquet = tmp_path / "manifest.parquet"
    pd.DataFrame({"caption": ["x one", "x two"]}).to_parquet(parquet)
    assert [p.prompt_id for p in load_prompts(str(parquet))] == [0, 1]


def test_bad_prompt_files_give_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(str(broken))
    wrong_shape = tmp_path / "dict.json"
    wrong_shape.write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="not a MultiGen prompt file"):
        load_prompts(str(wrong_shape))
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\xff\xfe")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_prompts(str(binary))
    no_caption = tmp_path / "m.jsonl"
    no_caption.write_text(json.dumps({"id": 1, "image": "a.png"}))
    with pytest.raises(ValueError, match="no caption"):
        load_prompts(str(no_caption))
    with pytest.raises(ValueError, match="unsupported prompt file"):
        (tmp_path / "p.csv").write_text("a,b")
        load_prompts(str(tmp_path / "p.csv"))
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.txt"))


def test_image_seed_is_stable_and_distinct() -> None:
    seeds = {image_seed(0, p, i) for p in range(50) for i in range(10)}
    assert len(seeds) == 500
    assert image_seed(3, 1, 2) == image_seed(3, 1, 2) != image_seed(4, 1, 2)


# ----------------------------------------------------------------------------- the sampler


# Tiny models are materialised once into the profile's shared cache (idempotent, atomic).
@pytest.fixture(scope="module")
def tiny_model_dir() -> str:
    from tokencompose_core.models import resolve_diffusion_dir

    return resolve_diffusion_dir(load_config("tiny").models)


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(uri)).astype(np.int16)


def test_batched_images_regenerate_alone_and_resume_skips(tiny_model_dir: str, tmp_path: Path) -> None:
    prompts = load_prompts("multigen:coco", max_prompts=2)
    config = load_config("tiny", [*STEPS, "sample.images_per_prompt=2", "sample.batch_size=4"])
    out = str(tmp_path / "batched")
    index_uri = sample_run(config, tiny_model_dir, out, prompts)
    index = storage.read_parquet(index_uri)
    assert list(index.columns) == INDEX_COLUMNS and len(index) == 4
    assert index["seed"].tolist() == [image_seed(0, p.prompt_id, i) for p in prompts for i in range(2)]
    first = _pixels(index["image_uri"][0])
    assert first.shape == (64, 64, 3) and first.std() > 0
    assert not np.array_equal(first, _pixels(index["image_uri"][1]))  # different seeds, different images

    # Prompt 1's images regenerated without prompt 0 (a short, padded batch) are bit-identical;
    # with another batch size they agree up to float rounding of differently shaped kernels.
    row = index[(index.prompt_id == prompts[1].prompt_id) & (index.image_index == 1)].iloc[0]
    for batch_size, tolerance in ((4, 0), (1, 2)):
        config_alone = load_config("tiny", [*STEPS, "sample.images_per_prompt=2", f"sample.batch_size={batch_size}"])
        alone_index = storage.read_parquet(sample_run(config_alone, tiny_model_dir, str(tmp_path / f"alone{batch_size}"),
                                                  prompts[1:]))
        alone_row = alone_index[alone_index.image_index == 1].iloc[0]
        assert alone_row.seed == row.seed
        assert np.abs(_pixels(alone_row.image_uri) - _pixels(row.image_uri)).max() <= tolerance

    # Resume: a deleted image is regenerated identically; the others are not rewritten.
    kept = Path(index["image_uri"][1])
    kept_mtime = kept.stat().st_mtime_ns
    removed = Path(index["image_uri"][0])
    removed.unlink()
    sample_run(config, tiny_model_dir, out, prompts)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert np.array_equal(_pixels(str(removed)), first)
    assert storage.read_json(storage.join(out, "stats.json"))["skipped"] == 3

    # Other settings into the same folder are refused instead of mixing images.
    other = load_config("tiny", [*STEPS, "sample.images_per_prompt=2", "sample.guidance_scale=5.0"])
    with pytest.raises(ValueError, match="other settings"):
        sample_run(other, tiny_model_dir, out, prompts)


def test_shards_cover_all_images_once(tiny_model_dir: str, tmp_path: Path) -> None:
    prompts = [Prompt(0, "a cat"), Prompt(1, "a dog"), Prompt(2, "a cup")]
    config = load_config("tiny", [*STEPS, "sample.images_per_prompt=1", "sample.scheduler=euler_a"])
    out = str(tmp_path / "sharded")
    for shard in range(2):
        sample_run(config, tiny_model_dir, out, prompts, shard=(shard, 2))
    index = storage.read_parquet(merge_shards(out, 2))
    assert index[["prompt_id", "image_index"]].values.tolist() == [[0, 0], [1, 0], [2, 0]]
    assert all(Path(u).is_file() for u in index["image_uri"])
    assert {Path(u).parent.name for u in index["image_uri"]} == {"shard-00000", "shard-00001"}
    assert storage.read_json(storage.join(out, "stats.json"))["images"] == 3
    with pytest.raises(ValueError, match="shard"):
        sample_run(config, tiny_model_dir, out, prompts, shard=(2, 2))


@pytest.fixture(scope="module")
def pixel_model_dir() -> str:
    from tokencompose_core.models import resolve_diffusion_dir

    return resolve_diffusion_dir(load_config("tiny", ["models.diffusion=tiny-pixel"]).models)


@pytest.mark.parametrize("scheduler", ["pndm", "dpm", "ddpm"])
def test_pixel_space_model_with_each_scheduler(pixel_model_dir: str, tmp_path: Path, scheduler: str) -> None:
    config = load_config("tiny", [*STEPS, "sample.images_per_prompt=2", f"sample.scheduler={scheduler}"])
    index = storage.read_parquet(sample_run(config, pixel_model_dir, str(tmp_path / "pix"), [Prompt(0, "a red circle")]))
    first, second = (_pixels(u) for u in index["image_uri"])
    assert first.shape == (16, 16, 3) and not np.array_equal(first, second)


def test_unknown_scheduler_is_refused(pixel_model_dir: str, tmp_path: Path) -> None:
    config = load_config("tiny", [*STEPS, "sample.scheduler=heun2"])
    with pytest.raises(ValueError, match="unknown scheduler 'heun2'"):
        sample_run(config, pixel_model_dir, str(tmp_path / "x"), [Prompt(0, "a red circle")])


def test_auto_device_is_the_first_gpu_this_process_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tokencompose_core.devices import resolve_device
    from tokencompose_core.sampling import resolve_dtype

    # Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), so "auto" never picks by shard.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert str(resolve_device("auto")) == "cuda"
    assert str(resolve_device("cuda:1")) == "cuda:1" and str(resolve_device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(resolve_device("auto")) == "cpu"
    assert resolve_dtype("fp16", torch.device("cuda:1")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.float32  # half precision is GPU-only


def _with_safety_checker(model_dir: str, root: Path, concept_weight: float) -> str:
    """A copy of the tiny model with a tiny random safety checker: concept weight -1 flags every
    image (cosine + 1 > 0), +2 none (cosine - 2 < 0)."""
    import shutil

    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    copy = root / f"model-{concept_weight}"
    shutil.copytree(model_dir, copy)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(concept_weight)
        checker.special_care_embeds_weights.fill_(concept_weight)
    checker.save_pretrained(copy / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        copy / "feature_extractor")
    return str(copy)


def test_safety_checker_blacks_out_flagged_images_like_the_stock_pipeline(tiny_model_dir: str, tmp_path: Path) -> None:
    from tokencompose_core.models import MissingWeightsError

    prompts = load_prompts("multigen:coco", max_prompts=1)
    plain = load_config("tiny", [*STEPS, "sample.images_per_prompt=2"])
    checked = load_config("tiny", [*STEPS, "sample.images_per_prompt=2", "sample.safety_checker=true"])
    with pytest.raises(MissingWeightsError, match="safety_checker"):
        sample_run(checked, tiny_model_dir, str(tmp_path / "none"), prompts)
    baseline = storage.read_parquet(sample_run(plain, tiny_model_dir, str(tmp_path / "plain"), prompts))
    flag_all = _with_safety_checker(tiny_model_dir, tmp_path, -1.0)
    flagged = storage.read_parquet(sample_run(checked, flag_all, str(tmp_path / "flagged"), prompts))
    assert all(_pixels(uri).max() == 0 for uri in flagged["image_uri"])
    flag_none = _with_safety_checker(tiny_model_dir, tmp_path, 2.0)
    kept = storage.read_parquet(sample_run(checked, flag_none, str(tmp_path / "kept"), prompts))
    for ours, theirs in zip(kept["image_uri"], baseline["image_uri"]):
        assert np.array_equal(_pixels(ours), _pixels(theirs)) and _pixels(ours).max() > 0


def _as_snapshot(model_dir: str, copy: Path, scheduler: str, safety_checker: list | None) -> str:
    """A copy of ``model_dir`` whose scheduler config and model_index.json read as a hub
    snapshot's: SD 2.1 names DDIMScheduler and ``"safety_checker": [null, null]``."""
    import shutil

    if not copy.exists():
        shutil.copytree(model_dir, copy)
    config_path = copy / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": scheduler}))
    index_path = copy / "model_index.json"
    index = {**json.loads(index_path.read_text()), "scheduler": ["diffusers", scheduler],
             "safety_checker": safety_checker or [None, None]}
    index_path.write_text(json.dumps(index))
    return str(copy)


def test_sd21_samples_as_its_snapshots_stock_pipeline(tiny_model_dir: str, tmp_path: Path) -> None:
    """``sample.scheduler: model`` and ``sample.safety_checker: model`` (the sd14 and sd21 profiles):
    the scheduler the snapshot's config names, and its safety checker only where it names one."""
    from tokencompose_core.models import MissingWeightsError
    from tokencompose_core.sampling import build_scheduler

    prompts = load_prompts("multigen:coco", max_prompts=1)
    small = ["sample.num_inference_steps=3", "sample.guidance_scale=3.0", "sample.images_per_prompt=2",
             "sample.resolution=64"]
    sd21 = load_config("sd21", small)
    assert (sd21.sample.scheduler, sd21.sample.safety_checker) == ("model", "model")
    snapshot = _as_snapshot(tiny_model_dir, tmp_path / "sd21-like", "DDIMScheduler", None)
    stock = storage.read_parquet(sample_run(sd21, snapshot, str(tmp_path / "stock"), prompts))
    explicit = load_config("sd21", [*small, "sample.scheduler=ddim", "sample.safety_checker=false"])
    ddim = storage.read_parquet(sample_run(explicit, snapshot, str(tmp_path / "ddim"), prompts))
    pndm = load_config("sd21", [*small, "sample.scheduler=pndm", "sample.safety_checker=false"])
    other = storage.read_parquet(sample_run(pndm, snapshot, str(tmp_path / "pndm"), prompts))
    for ours, theirs, not_theirs in zip(stock["image_uri"], ddim["image_uri"], other["image_uri"]):
        assert np.array_equal(_pixels(ours), _pixels(theirs)) and not np.array_equal(_pixels(ours), _pixels(not_theirs))
    # The setting this replaces: a checker asked for on a snapshot that has none stops sampling.
    with pytest.raises(MissingWeightsError, match="safety_checker"):
        sample_run(load_config("sd21", [*small, "sample.safety_checker=true"]), snapshot, str(tmp_path / "old"), prompts)

    # A snapshot that names its checker (SD 1.4) gets it: this tiny one flags every image.
    with_checker = _as_snapshot(_with_safety_checker(tiny_model_dir, tmp_path, -1.0), tmp_path / "model--1.0",
                                "PNDMScheduler", ["stable_diffusion", "StableDiffusionSafetyChecker"])
    flagged = storage.read_parquet(sample_run(load_config("sd14", small), with_checker, str(tmp_path / "sd14"), prompts))
    assert all(_pixels(uri).max() == 0 for uri in flagged["image_uri"])
    with pytest.raises(ValueError, match="sample.scheduler=model"):
        build_scheduler("model", {}, "FlowMatchEulerDiscreteScheduler")
