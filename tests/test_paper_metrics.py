"""FID, CLIP score, paired bootstrap intervals and latency: the evaluation a paper needs.

Unit tests on known inputs, then `tokencompose run -p tiny` through the CLI, which
must write FID, CLIP score, MultiGen and mIoU into the report, and a base-model run
scored beside the trained one, which must add paired intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tokencompose_core import storage
from tokencompose_core.intervals import bootstrap_mean_differences, paired_intervals


def test_bootstrap_interval_is_seeded_and_covers_a_known_shift() -> None:
    rng = np.random.default_rng(1)
    baseline = rng.normal(50, 10, size=400)
    treated = baseline + 3.0 + rng.normal(0, 1, size=400)  # a true mean shift of 3 points
    table = lambda values: pd.DataFrame({"unit": [f"prompt {i}" for i in range(400)], "metric": "MG2",  # noqa: E731
                                         "value": values})
    (row,) = paired_intervals(table(baseline), table(treated), resamples=2000, seed=0)
    assert row["metric"] == "MG2" and row["units"] == 400
    assert row["low"] < 3.0 < row["high"] and row["high"] - row["low"] < 0.5  # paired: noise of 1, not of 10
    assert row["difference"] == pytest.approx(float(np.mean(treated - baseline)))
    assert paired_intervals(table(baseline), table(treated), resamples=2000, seed=0) == [row]
    # No difference at all: the interval is the single point 0.
    (same,) = paired_intervals(table(baseline), table(baseline), resamples=1000, seed=0)
    assert same["low"] == same["high"] == same["difference"] == 0.0


def test_bootstrap_leaves_out_units_a_metric_lacks() -> None:
    differences = np.array([[1.0, np.nan], [1.0, 2.0], [1.0, 4.0]])
    low, high = bootstrap_mean_differences(differences, resamples=1000, seed=0)
    assert low[0] == high[0] == 1.0 and 2.0 <= low[1] <= high[1] <= 4.0
    with pytest.raises(ValueError, match="no paired units"):
        bootstrap_mean_differences(np.zeros((0, 2)), resamples=1000, seed=0)


def _images(folder: Path, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    return uris


def test_fid_is_zero_against_itself_and_grows_with_a_different_set(tmp_path: Path) -> None:
    from tokencompose_core.image_metrics import fid_score, reference_statistics
    from tokencompose_core.models.scorers import load_inception

    images = _images(tmp_path / "ref", 4, seed=0)
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps({"image": u, "captions": ["x"]}) + "\n" for u in images))
    inception = load_inception("tiny", 0, num_features=64)
    stats = reference_statistics(str(tmp_path / "ref.jsonl"), None, inception, str(tmp_path / "stats"), 2)
    same = pd.DataFrame({"prompt_id": range(4), "image_index": 0, "image_uri": images})
    other = same.assign(image_uri=[np.asarray(Image.open(u)) for u in images])
    for i, array in enumerate(other["image_uri"]):  # the same images, darkened: a shifted distribution
        Image.fromarray((array // 4).astype(np.uint8)).save(tmp_path / f"dark{i}.png")
    other["image_uri"] = [str(tmp_path / f"dark{i}.png") for i in range(4)]
    results = {}
    for name, frame in (("same", same), ("other", other)):
        storage.atomic_write_parquet(frame, str(tmp_path / name / "index.parquet"))
        uri = fid_score(str(tmp_path / name / "index.parquet"), stats, inception, str(tmp_path / name), 3)
        results[name] = storage.read_json(uri)
    assert results["same"]["fid"] == pytest.approx(0.0, abs=1e-3) and results["same"]["reference_images"] == 4
    assert results["other"]["fid"] > 1.0
    storage.atomic_write_parquet(same[:1], str(tmp_path / "one" / "index.parquet"))
    one = storage.read_json(fid_score(str(tmp_path / "one" / "index.parquet"), stats, inception, str(tmp_path / "one"), 3))
    assert one["fid"] is None and "at least 2" in one["note"]  # no covariance from one image, no failure


def _random_fid_weights(path: Path) -> dict:
    """A pt_inception-shaped state dict with seeded random weights and batch-norm statistics,
    saved to ``path``: FID's network without its (downloaded) weights."""
    import torch
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    network = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008,
                           transform_input=False)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    state = {name: tensor.contiguous() for name, tensor in network.state_dict().items()}
    save_file(state, str(path))
    return state


def test_our_fid_inception_gives_pytorch_fids_features_on_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    """FID is defined on the TF 2015 Inception graph, whose mixed blocks pool differently from
    torchvision's Inception-v3: on the same weights our features are pytorch-fid's (the reference
    implementation of FID) to 1e-4, and torchvision's plain network would not be."""
    import pytorch_fid.inception as reference
    import torch
    from torchvision.models import inception_v3

    from tokencompose_core.models.scorers import InceptionFeatures, load_inception

    weights = tmp_path / "pt_inception.safetensors"
    state = _random_fid_weights(weights)
    monkeypatch.setattr(reference, "load_state_dict_from_url", lambda *args, **kwargs: state)
    theirs = reference.InceptionV3([reference.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours = load_inception(str(weights), num_features=2048)
    images = torch.randint(0, 256, (3, 3, 120, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(images.float() / 255.0)[0].flatten(1)
        got = ours(images)
        plain = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008,
                             transform_input=False)
        plain.load_state_dict(state)
        torchvision_features = InceptionFeatures(plain, 2048)(images)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale, float((got - expected).abs().max() / scale)
    assert (torchvision_features - expected).abs().max() > 1e-3 * scale  # the check can fail


def test_missing_inception_weights_name_the_file(tmp_path: Path) -> None:
    from tokencompose_core.models import MissingWeightsError
    from tokencompose_core.models.scorers import load_inception

    missing = str(tmp_path / "pt_inception.pth")
    with pytest.raises(MissingWeightsError, match="pt_inception.pth.*score.inception_weights"):
        load_inception(missing)


def test_clip_score_per_image_and_per_prompt(tmp_path: Path) -> None:
    from tokencompose_core.config import ScoreConfig
    from tokencompose_core.stages.score import score_clip

    images = _images(tmp_path / "samples", 4, seed=2)
    index = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "image_index": [0, 1, 0, 1], "prompt": ["a cat", "a cat",
                          "a dog and a kite", "a dog and a kite"], "image_uri": images})
    storage.atomic_write_parquet(index, str(tmp_path / "samples" / "index.parquet"))
    uri = score_clip(str(tmp_path / "samples" / "index.parquet"), ScoreConfig(metrics_batch_size=3), 0, "coco",
                     str(tmp_path / "scores"))
    record = storage.read_json(uri)
    per_prompt = storage.read_parquet(str(tmp_path / "scores" / "per_unit_clip.parquet"))
    assert record["images"] == 4 and 0.0 <= record["clip_score"] <= 100.0
    assert list(per_prompt["unit"]) == ["prompt 0", "prompt 1"]
    assert per_prompt["value"].mean() == pytest.approx(record["clip_score"])


BASE = ["masks.shard_size=2", "masks.batch_size=2", "train.max_steps=2", "train.batch_size=1",
        "train.checkpoint_every=2", "train.resolution=32", "sample.max_prompts=3", "sample.images_per_prompt=2",
        "sample.num_inference_steps=2", "score.heldout_images=2", "score.report_overlays=1",
        "score.bootstrap_resamples=1000", "score.export=[geneval,t2i_compbench]"]


def test_run_tiny_reports_fid_clip_multigen_miou_and_paired_intervals_beside_a_baseline(
        prefect_harness, tmp_path: Path, capsys) -> None:
    from flows.cli import main
    from helpers import photo_manifest

    manifest = photo_manifest(tmp_path)
    overrides = [f"storage.root={tmp_path / 'root'}", *BASE]
    assert main(["run", "-p", "tiny", "--input", manifest, *overrides]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = Path(summary["stages"]["score"]["summary"]["report"]["md"]).read_text()
    header = report.splitlines()[2]
    for column in ("MG2", "MG5", "mIoU fixed", "FID", "CLIP score", "s/image"):
        assert column in header, (column, header)
    (scores,) = summary["stages"]["score"]["summary"]["scores"]
    fid = storage.read_json(storage.join(scores, "fid.json"))
    assert fid["reference_images"] == 3 and np.isfinite(fid["fid"]) and fid["fid"] >= 0  # the input manifest
    assert f"{fid['fid']:.2f}" in report and "(2 steps, batch" in report
    assert "bootstrap" not in report  # no baseline scored beside it: no pairs
    assert len(list(Path(scores, "geneval").glob("*/samples/*.png"))) == 6  # 3 prompts x 2 images
    assert len(list(Path(scores, "t2i_compbench", "samples").glob("*_00000[0-5].png"))) == 6

    # The base model sampled with the same prompts and seeds: the next run scores it beside
    # the trained run's samples, paired.
    assert main(["sample", "-p", "tiny", *overrides]) == 0
    capsys.readouterr()
    assert main(["run", "-p", "tiny", "--input", manifest, *overrides]) == 0
    scored = json.loads(capsys.readouterr().out)["stages"]["score"]["summary"]
    assert "base" in scored["runs"] and len(scored["scores"]) == 2
    report = Path(scored["report"]["md"]).read_text()
    assert "95% bootstrap intervals" in report and Path(scored["report"]["png_intervals"]).is_file()
    section = report.split("95% bootstrap intervals")[1].split("\n\n")[1]
    for metric in ("coco MG2", "CLIP score", "attention mIoU"):
        assert f"| {metric} |" in section, (metric, section)
    assert len(list((tmp_path / "root" / "fid").iterdir())) == 1  # reference statistics computed once


def _samples_folder(root: Path, prompts_spec: str, prompts: list, images_per_prompt: int = 2) -> str:
    """A samples folder as stage 4 leaves it: images, index.parquet, sample_meta.json."""
    from tokencompose_core.config import SampleConfig
    from tokencompose_core.sampling import png_bytes

    rows = []
    for prompt_id, text in ((p.prompt_id, p.text) for p in prompts):
        for image_index in range(images_per_prompt):
            uri = str(root / "images" / f"p{prompt_id}_i{image_index}.png")
            storage.atomic_write_bytes(uri, png_bytes(np.full((8, 8, 3), (10 * prompt_id + image_index) % 256,
                                                              np.uint8)))
            rows.append((prompt_id, image_index, 0, text, uri, "fp"))
    storage.atomic_write_parquet(pd.DataFrame(rows, columns=["prompt_id", "image_index", "seed", "prompt", "image_uri",
                                                             "model_fingerprint"]), str(root / "index.parquet"))
    storage.atomic_write_json(str(root / "sample_meta.json"),
                              {"sample": SampleConfig(prompts=prompts_spec).model_dump(mode="json")})
    return str(root)


def test_geneval_prompts_and_export_in_genevals_layout(tmp_path: Path) -> None:
    from tokencompose_core.handoff import export_geneval
    from tokencompose_core.sampling import load_prompts, prompt_set_name

    metadata = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
                {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
                 "prompt": "a photo of two cats"}]
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    spec = f"geneval:{tmp_path / 'evaluation_metadata.jsonl'}"
    prompts = load_prompts(spec)
    assert [(p.prompt_id, p.text, p.categories) for p in prompts] == [
        (0, "a photo of a bench", ("bench",)), (1, "a photo of two cats", ("cat",))]
    assert prompt_set_name(spec) == "geneval"

    samples = _samples_folder(tmp_path / "samples", spec, prompts)
    out = Path(export_geneval(samples, str(tmp_path / "geneval")))
    # Read back as GenEval's evaluate_images.py does: numbered folders, their metadata, samples/*.png.
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["00000", "00001"]
    for number, folder in enumerate(folders):
        assert json.loads((out / folder / "metadata.jsonl").read_text()) == metadata[number]
        assert sorted(p.name for p in (out / folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        image = np.asarray(Image.open(out / folder / "samples" / "0001.png"))
        assert image[0, 0, 0] == 10 * number + 1  # the right image in the right place


def test_multigen_samples_export_to_geneval_and_t2i_compbench(tmp_path: Path) -> None:
    from tokencompose_core.handoff import export_geneval, export_t2i_compbench
    from tokencompose_core.sampling import load_prompts

    prompts = load_prompts("multigen:coco", 2)
    samples = _samples_folder(tmp_path / "samples", "multigen:coco", prompts)
    out = Path(export_geneval(samples, str(tmp_path / "geneval")))
    first = json.loads((out / f"{prompts[0].prompt_id:05d}" / "metadata.jsonl").read_text())
    assert first["prompt"] == prompts[0].text
    assert [item["class"] for item in first["include"]] == list(dict.fromkeys(prompts[0].categories))

    folder = Path(export_t2i_compbench(samples, str(tmp_path / "compbench")))
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{p.text}_{n:06d}.png" for n, p in enumerate(prompts[i // 2] for i in range(4)))
    # T2I-CompBench's evaluators take the prompt back from the name before the last '_'.
    assert {name.rsplit("_", 1)[0] for name in names} == {p.text for p in prompts}


def test_inception_weights_file_loads_exactly_or_is_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    from tokencompose_core.models.scorers import FID_CLASSES, load_inception

    network = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=FID_CLASSES)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "fid.safetensors"))
    loaded = load_inception(str(tmp_path / "fid.safetensors"), num_features=2048)
    # Every parameter and batch-norm statistic up to pool3 is the file's (the forward pass
    # is pytorch-fid's: test_our_fid_inception_gives_pytorch_fids_features_on_the_same_weights).
    blocks = [name for name, _ in network.named_children() if name not in ("avgpool", "dropout", "fc")]
    ours = {f"{blocks[int(key.split('.', 1)[0])]}.{key.split('.', 1)[1]}": value
            for key, value in loaded.layers.state_dict().items()}
    theirs = {key: value for key, value in network.state_dict().items() if key.split(".", 1)[0] in blocks}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)
    del network.Mixed_7c  # a file that leaves parameters unset is never a partly random network
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        load_inception(str(tmp_path / "partial.safetensors"))
