"""LoRA fine-tuning (train.lora): adapters only, grounding gradients, exact resume, diffusers'
format, and `tokencompose run -p tiny train.lora.rank=4` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (PIPELINE_SETTINGS, photo_manifest, resume_after_kill, run_pipeline, stage_folders, train_config,
                     train_run)
from tokencompose_core import checkpoints, lora, outputs
from tokencompose_core.attention import AttentionCapture, CaptureAttnProcessor, supervised_groups
from tokencompose_core.config import load_config
from tokencompose_core.losses import grounding_losses
from tokencompose_core.models import load_diffusion, resolve_diffusion_dir
from tokencompose_core.reevaluation import newest_checkpoint
from tokencompose_core.sampling import load_parts, model_fingerprint
from tokencompose_core.stages.sample import trained_unet
from tokencompose_core.stages import stage_settings

RANK = ("train.lora.rank=4",)


@pytest.fixture(scope="module")
def model_dir() -> str:
    return resolve_diffusion_dir(load_config("tiny", []).models)


def _lora_unet(model_dir: str, rank: int = 4) -> torch.nn.Module:
    unet = load_diffusion(model_dir).unet
    torch.manual_seed(0)
    lora.add_lora(unet, load_config("tiny", [f"train.lora.rank={rank}"]).train.lora)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # as after some training: B starts at 0, which leaves A without gradient
            torch.nn.init.normal_(parameter, std=0.05)
    return unet


def _inputs(unet: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    side = unet.config.sample_size
    return (torch.randn(batch, unet.config.in_channels, side, side, generator=generator), torch.tensor([10, 700]),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator))


def test_only_adapters_train_and_grounding_gradients_reach_them(model_dir):
    unet = _lora_unet(model_dir)
    trainable = {name for name, parameter in unet.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == {"to_q", "to_k", "to_v", "0"}

    latents, timesteps, text = _inputs(unet)
    with torch.no_grad():
        reference = unet(latents, timesteps, text).sample
    groups = supervised_groups(unet, ["mid", "up"], unet.config.sample_size)
    with AttentionCapture(unet, groups) as capture:
        layer = dict(unet.named_modules())[groups["mid_2"][0]]
        assert isinstance(layer.processor, CaptureAttnProcessor) and hasattr(layer.to_q, "lora_A")
        positions = capture.capture_tokens(torch.tensor([[[1, -1], [3, 4]]] * 2))
        output = unet(latents, timesteps, text).sample
        # The capture processor computes the LoRA-wrapped layer's own output.
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
        masks = torch.zeros(2, 2, 8, 8)
        masks[:, 0, :4], masks[:, 1, 4:] = 1, 1
        total = sum(sum(grounding_losses(maps, masks, positions)) for maps in capture.maps().values())
        total.backward()  # grounding only: no denoising loss
    named = dict(unet.named_parameters())
    for name in groups["up_8"][:1] + groups["mid_2"][:1]:
        for projection in ("to_q", "to_k"):
            for factor in ("lora_A", "lora_B"):
                grad = named[f"{name}.{projection}.{factor}.default.weight"].grad
                assert grad is not None and grad.abs().sum() > 0, (name, projection, factor)
    assert all(parameter.grad is None for parameter in unet.parameters() if not parameter.requires_grad)


def test_lora_settings_key_the_run():
    off, on = load_config("tiny", []), load_config("tiny", [*RANK])
    assert stage_settings(off, "train")["train"]["lora"]["rank"] == 0
    assert stage_settings(on, "train")["train"]["lora"] == {"rank": 4, "alpha": None, "dropout": 0.0,
                                                   "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def test_a_lora_run_is_found_as_the_trained_weights(tmp_path):
    config = load_config("tiny", [f"storage.root={tmp_path}"])
    adapter = tmp_path / "train" / "run-a" / "lora"
    adapter.mkdir(parents=True)
    (adapter / lora.WEIGHTS_NAME).write_bytes(b"")
    assert newest_checkpoint(config) == str(adapter.parent)  # the nightly re-evaluation's pick
    assert trained_unet(config, str(adapter.parent)) == str(adapter)  # what the sample stage loads


def test_lora_run_resumes_exactly_and_loads_into_a_stock_pipeline(tmp_path, cache_uri, model_dir, monkeypatch):
    settings = (*RANK, "train.lora.alpha=8", "train.max_steps=2", "train.checkpoint_every=1",
                "train.gradient_accumulation_steps=2", "train.ema_decay=0.9", "train.lr_scheduler=cosine",
                "train.lr_warmup_steps=1")
    straight = train_run(train_config(tmp_path, *settings), cache_uri, str(tmp_path / "straight"))
    run = tmp_path / "straight"
    assert straight.unet_uri == str(run / "lora") and not (run / "unet").exists()
    assert sorted(os.listdir(checkpoints.checkpoint_dir(str(run), 2))) == [
        "_manifest.json", "ema.pt", "lora", "lr_scheduler.pt", "optimizer.pt", "rng-0.pt", "state.json"]
    assert all(path.startswith(("lora/", "metrics", "loss_curve")) for path in checkpoints.result_files(str(run)))

    resumed = resume_after_kill(monkeypatch, train_config(tmp_path, *settings), cache_uri, str(tmp_path / "resumed"), 1)

    ours, theirs = (load_file(os.path.join(result.unet_uri, lora.WEIGHTS_NAME)) for result in (resumed, straight))
    assert ours.keys() == theirs.keys() and all(key.startswith("unet.") and ".lora." in key for key in ours)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(straight.unet_uri)
    adapter = load_diffusion(model_dir).unet
    lora.add_lora(adapter, train_config(tmp_path, *settings).train.lora)
    lora.load_lora_state(adapter, straight.unet_uri)
    merged = load_parts(model_dir, straight.unet_uri, torch.device("cpu"), torch.float32).unet
    assert not lora.has_lora(merged)  # the sampler's U-Net is a plain one
    inputs = _inputs(adapter)
    with torch.no_grad():
        stock = pipe.unet(*inputs).sample
        assert not torch.equal(stock, load_diffusion(model_dir).unet(*inputs).sample)  # the LoRA does something
        torch.testing.assert_close(adapter(*inputs).sample, stock, rtol=0, atol=0)
        torch.testing.assert_close(merged(*inputs).sample, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_run_with_lora_end_to_end(prefect_harness, tmp_path, capsys):
    summary, states = run_pipeline(photo_manifest(tmp_path),
                                   [f"storage.root={tmp_path / 'root'}", *PIPELINE_SETTINGS, "train.lora.rank=4"])
    assert all("Completed" in names for names in states.values()), states
    folders = stage_folders(summary)
    run = Path(folders["train"])
    assert (run / "lora" / lora.WEIGHTS_NAME).is_file() and not (run / "unet").exists()
    recorded = {entry["path"] for entry in outputs.read_record(str(run))["files"]}
    assert f"lora/{lora.WEIGHTS_NAME}" in recorded
    sample_inputs = outputs.read_record(folders["sample"])["inputs"]
    assert sample_inputs["unet_dir"] == str(run / "lora")
    # The samples' key holds the adapter's content.
    assert sample_inputs["model_identity"] == model_fingerprint(sample_inputs["model_dir"], str(run / "lora"))
    for stage, folder in folders.items():
        assert outputs.problems(folder) == [], stage
    (scores,) = [uri for uri in summary["stages"]["score"]["summary"]["scores"] if Path(uri).name.startswith(run.name)]
    segmentation = json.loads(Path(scores, "segmentation.json").read_text())
    assert set(segmentation["groups"]) == {"mid_2", "up_4", "up_8"}
    assert 0 <= segmentation["overall"]["miou_fixed"] <= 100, segmentation
