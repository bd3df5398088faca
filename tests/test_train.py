"""Stage 3 end to end on tiny models: outputs, exact resume, pixel space, the Prefect flow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from helpers import resume_after_kill, train_config, train_run
from tokencompose_core import train as train_module
from tokencompose_core.attention import CaptureAttnProcessor
from tokencompose_core.data import ResumableBatchSampler
from tokencompose_core.checkpoints import checkpoint_dir, checkpoint_steps

def _weights(unet_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))


def test_sampler_resumes_mid_epoch_and_splits_between_processes():
    full = ResumableBatchSampler(10, 2, seed=3)
    first = [batch for _, batch in zip(range(12), iter(full))]
    resumed = [batch for _, batch in zip(range(5), iter(ResumableBatchSampler(10, 2, seed=3, start=7)))]
    assert resumed == first[7:12]  # crosses an epoch boundary (5 batches per epoch)
    assert sorted(sum(first[:5], [])) == list(range(10))
    shards = [next(iter(ResumableBatchSampler(10, 5, seed=3, rank=r, world_size=2))) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_train_outputs_checkpoints_and_stock_pipeline(tmp_path, cache_uri):
    config = train_config(tmp_path, "train.checkpoints_total_limit=1")
    result = train_run(config, cache_uri, str(tmp_path / "run"))
    run = tmp_path / "run"
    assert result.global_step == 4 and result.unet_uri == str(run / "unet")
    assert checkpoint_steps(str(run)) == [4]  # total limit 1
    assert not [name for name in os.listdir(run / "checkpoints") if name.startswith(".tmp")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    groups = {"mid_2", "up_4", "up_8"}
    assert {f"token/{g}" for g in groups} | {f"pixel/{g}" for g in groups} <= set(records[0])
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert set(result.final_losses) >= {"loss", "denoise", "token/up_8"}
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "tensorboard").is_dir()

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tokencompose_core.models import resolve_diffusion_dir

    pipe = StableDiffusionPipeline.from_pretrained(resolve_diffusion_dir(config.models), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.unet = UNet2DConditionModel.from_pretrained(result.unet_uri)
    assert not any(isinstance(p, CaptureAttnProcessor) for p in pipe.unet.attn_processors.values())
    image = pipe("a photo of a square", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, cache_uri, monkeypatch):
    settings = ("train.gradient_accumulation_steps=2", "train.ema_decay=0.9", "train.caption_dropout=0.3",
                "train.lr_scheduler=cosine", "train.lr_warmup_steps=1")
    straight = train_run(train_config(tmp_path, *settings), cache_uri, str(tmp_path / "straight"))
    resumed = resume_after_kill(monkeypatch, train_config(tmp_path, *settings), cache_uri, str(tmp_path / "resumed"), 2)

    assert resumed.global_step == 4
    ours, theirs = _weights(resumed.unet_uri), _weights(straight.unet_uri)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    raw = _weights(checkpoint_dir(str(tmp_path / "resumed"), 4) + "/unet")
    assert any(not torch.equal(raw[name], value) for name, value in ours.items())  # unet/ holds the EMA
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_pixel_space_plain_fine_tune_from_init_unet(tmp_path, cache_uri):
    overrides = ("models.diffusion=tiny-pixel", "train.resolution=16", "train.token_loss_weight=0",
                 "train.pixel_loss_weight=0", "train.max_steps=2", "train.cache_samples=true")
    train_run(train_config(tmp_path, *overrides), cache_uri, str(tmp_path / "base"))
    records = (tmp_path / "base" / "metrics.jsonl").read_text()
    assert "token/" not in records and "denoise" in records
    grounded = train_run(
        train_config(tmp_path, "models.diffusion=tiny-pixel", "train.resolution=16", "train.max_steps=2",
                     "train.grounding.layers=[up]", "train.grounding.group_weights={up_8: 0.0}",
                     f"train.init_unet={tmp_path / 'base'}"),
        cache_uri, str(tmp_path / "grounded"),
    )
    assert {key.split("/")[1] for key in grounded.final_losses if "/" in key} == {"up_16"}


def test_train_flow_names_the_run_and_caches(tmp_path, cache_uri, prefect_harness):
    from flows.train import train_flow

    overrides = [f"storage.root={tmp_path}", "train.max_steps=2"]
    summary = train_flow("tiny", overrides, input_uri=cache_uri)
    run = Path(summary["output_uri"])
    assert run.parent == tmp_path / "train" and run.name.startswith("run-")
    assert summary["global_step"] == 2 and summary["unet_uri"] == str(run / "unet")
    weights = run / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert train_flow("tiny", overrides, input_uri=cache_uri) == summary
    assert weights.stat().st_mtime_ns == written  # second run: a cache hit, nothing retrained
    other = train_flow("tiny", [*overrides, "train.learning_rate=3e-4"], input_uri=cache_uri)
    assert other["output_uri"] != summary["output_uri"]


def test_prediction_targets_follow_the_scheduler():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    latents, noise, steps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    for kind, expected in (("epsilon", noise), ("sample", latents)):
        model = SimpleNamespace(noise_scheduler=DDPMScheduler(prediction_type=kind))
        assert torch.equal(train_module._targets(model, latents, noise, steps), expected)
    scheduler = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    alpha = scheduler.alphas_cumprod[steps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[steps]).sqrt().view(-1, 1, 1, 1)
    velocity = train_module._targets(SimpleNamespace(noise_scheduler=scheduler), latents, noise, steps)
    torch.testing.assert_close(velocity, alpha * noise - sigma * latents)
