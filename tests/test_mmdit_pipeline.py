"""SD 3.5- and FLUX-shaped models (tiny-sd3, tiny-flux) through the whole DAG, as a user runs it.

Per profile, through the CLI: a full fine-tune run; then LoRA rank 4 with a grounding setting
changed (nouns and masks are hits, the rest runs); then back to the first settings, which is
all cache hits on the very same folders; then the transformer's weights file deleted, which
only training repairs. Around it: the LoRA folder loads with the stock
pipeline's ``load_lora_weights`` and gives our transformer's output; our sampler gives the stock
pipeline's images; flow-matching noise levels follow each family's convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flows.reevaluate import reevaluate_flow
from helpers import PIPELINE_SETTINGS, photo_manifest, resume_after_kill, run_pipeline, stage_folders, train_run
from tokencompose_core import lora, outputs
from tokencompose_core.attention import mmdit_blocks
from tokencompose_core.conditioning import encode_mmdit
from tokencompose_core.config import FlowMatchingConfig, load_config
from tokencompose_core.flow_matching import draw_noise, flux_shift, training_sigmas
from tokencompose_core.models import load_mmdit, resolve_diffusion_dir
from tokencompose_core.prompts import Prompt
from tokencompose_core.sampling import load_parts, merge_shards, sample
from tokencompose_core.stages import STAGES

PROFILES = ["tiny-sd3", "tiny-flux"]


def _model_dir(profile: str) -> str:
    return resolve_diffusion_dir(load_config(profile).models)


def _stock_pipeline(model_dir: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    family = load_mmdit(model_dir).family
    return (FluxPipeline if family == "flux" else StableDiffusion3Pipeline).from_pretrained(model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_whole_dag_full_then_lora_with_a_grounding_change_then_back_then_a_lost_weights_file(
        profile, prefect_harness, tmp_path):
    manifest = photo_manifest(tmp_path)
    base = [f"storage.root={tmp_path / 'root'}", *PIPELINE_SETTINGS]
    stages = list(STAGES)

    first, states = run_pipeline(manifest, base, profile)
    assert all("Completed" in names for names in states.values()), states
    original = stage_folders(first)
    run = Path(original["train"])
    assert (run / "transformer" / "config.json").is_file() and not (run / "unet").exists()
    for stage, folder in original.items():
        assert outputs.problems(folder) == [], stage
    (scores,) = [uri for uri in first["stages"]["score"]["summary"]["scores"] if Path(uri).name.startswith(run.name)]
    segmentation = json.loads(Path(scores, "segmentation.json").read_text())
    # Attention mIoU per joint block, so a user can see which blocks ground nouns.
    model_dir = _model_dir(profile)
    assert set(segmentation["groups"]) == set(mmdit_blocks(load_mmdit(model_dir).transformer))
    assert 0 <= segmentation["overall"]["miou_fixed"] <= 100, segmentation
    assert all(Path(scores, name).is_file() for name in ("multigen.json", "clip.json", "fid.json"))

    changed = [*base, "train.lora.rank=4", "train.grounding.text_keys_only=true"]
    adapted, states = run_pipeline(manifest, changed, profile)
    for stage in stages:
        expected = {"Cached"} if stage in ("nouns", "masks") else {"Completed"}
        assert states[stage] == expected or (expected == {"Completed"} and "Completed" in states[stage]), states
    lora_dir = Path(stage_folders(adapted)["train"]) / lora.LORA_DIR
    assert (lora_dir / lora.WEIGHTS_NAME).is_file()

    # The adapter loads with the stock pipeline and gives exactly the transformer we trained.
    pipe = _stock_pipeline(model_dir)
    pipe.load_lora_weights(str(lora_dir))
    trained = load_mmdit(model_dir).transformer
    lora.add_lora(trained, load_config(profile, [*base, "train.lora.rank=4"]).train.lora)
    lora.load_lora_state(trained, str(lora_dir))
    merged = load_parts(model_dir, str(lora_dir), torch.device("cpu"), torch.float32).transformer
    assert not lora.has_lora(merged)  # the sampler's transformer is a plain one
    inputs = _transformer_inputs(pipe.transformer, model_dir)
    with torch.no_grad():
        stock = pipe.transformer(**inputs)[0]
        assert not torch.equal(stock, load_mmdit(model_dir).transformer(**inputs)[0])  # the LoRA does something
        torch.testing.assert_close(trained(**inputs)[0], stock, rtol=0, atol=0)
        torch.testing.assert_close(merged(**inputs)[0], stock, rtol=1e-5, atol=1e-5)

    # The nightly re-evaluation finds the newest trained weights (the adapter) and scores them.
    nightly = reevaluate_flow(profile, changed)
    assert nightly["checkpoint"].startswith(str(lora_dir.parent)), nightly["checkpoint"]
    assert {row["metric"] for row in nightly["comparison"]} >= {"coco MG2"}

    again, states = run_pipeline(manifest, base, profile)
    assert states == {stage: {"Cached"} for stage in stages}, states
    assert stage_folders(again) == original

    # A lost weights file: training publishes it again from its final checkpoint, bit for bit,
    # and everything downstream stays a cache hit.
    weights = run / "transformer" / "diffusion_pytorch_model.safetensors"
    published = weights.read_bytes()
    weights.unlink()
    repaired, states = run_pipeline(manifest, base, profile)
    assert weights.read_bytes() == published and stage_folders(repaired) == original
    assert {stage: names for stage, names in states.items() if names != {"Cached"}} == {"train": {"Completed"}}, states


def _transformer_inputs(transformer: torch.nn.Module, model_dir: str) -> dict:
    """Seeded inputs of the right shapes for either family's transformer."""
    parts = load_mmdit(model_dir)
    generator = torch.Generator().manual_seed(0)
    text = encode_mmdit(parts, ["a cat next to a wall"])
    if parts.family == "sd3":
        latents = torch.randn(1, parts.latent_channels, 8, 8, generator=generator)
        return {"hidden_states": latents, "timestep": torch.tensor([500.0]), "encoder_hidden_states": text.hidden,
                "pooled_projections": text.pooled, "return_dict": False}
    packed = torch.randn(1, 16, parts.latent_channels * 4, generator=generator)
    from diffusers import FluxPipeline

    return {"hidden_states": packed, "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
            "pooled_projections": text.pooled, "encoder_hidden_states": text.hidden,
            "txt_ids": torch.zeros(text.hidden.shape[1], 3),
            "img_ids": FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32), "return_dict": False}


@pytest.mark.parametrize("profile", PROFILES)
def test_our_sampler_gives_the_stock_pipelines_images(profile, tmp_path):
    """Batched (a short batch padded) and sharded, each image is the stock pipeline's for its seed."""
    config = load_config(profile, ["sample.images_per_prompt=1", "sample.batch_size=2", "sample.num_inference_steps=3"])
    model_dir = _model_dir(profile)
    prompts = [Prompt(0, "a red square and a blue circle", ("square", "circle")),
               Prompt(1, "a cat", ("cat",)), Prompt(2, "a dog on a sofa", ("dog", "sofa"))]
    index = sample(config.sample, config.models, model_dir, str(tmp_path / "samples"), prompts)
    rows = pd.read_parquet(index)
    pipe = _stock_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    side = config.sample.resolution or load_mmdit(model_dir).sample_size
    for row in rows.itertuples():
        stock = pipe(prompt=row.prompt, generator=torch.Generator().manual_seed(int(row.seed)), height=side,
                     width=side, num_inference_steps=3, guidance_scale=config.sample.guidance_scale,
                     max_sequence_length=config.models.max_sequence_length, output_type="np").images[0]
        ours = np.asarray(Image.open(row.image_uri)).astype(np.float32) / 255
        assert np.abs(ours - stock).max() <= 1 / 255 + 1e-6, (profile, row.prompt)
    # Sharded over two workers, every image is the unsharded one, byte for byte.
    sharded = str(tmp_path / "sharded")
    for shard in ((0, 2), (1, 2)):
        sample(config.sample, config.models, model_dir, sharded, prompts, shard=shard)
    merged = pd.read_parquet(merge_shards(sharded, 2))
    images = [Path(uri).read_bytes() for uri in rows["image_uri"]]
    assert [Path(uri).read_bytes() for uri in merged["image_uri"]] == images


def test_flow_matching_noise_levels_follow_each_family():
    settings = FlowMatchingConfig()
    sd3 = load_mmdit(_model_dir("tiny-sd3"))
    latents = torch.zeros(4, sd3.latent_channels, 16, 16)
    noised = draw_noise(sd3.scheduler, settings, latents, torch.Generator().manual_seed(0))
    # SD 3 trains on its scheduler's own (statically shifted) sigmas.
    assert all(torch.isclose(sd3.scheduler.sigmas.float(), sigma).any() for sigma in noised.sigmas)
    torch.testing.assert_close(noised.target, noised.noisy / noised.sigmas.view(-1, 1, 1, 1))  # x0 = 0: v = n
    flux = load_mmdit(_model_dir("tiny-flux"))
    draws = torch.linspace(0.05, 0.95, 7)
    small, large = (training_sigmas(flux.scheduler, draws, size) for size in ((16, 16), (128, 128)))
    # FLUX shifts by image length: the same draws are noisier for a larger image.
    assert flux_shift(flux.scheduler, 64 * 64) > flux_shift(flux.scheduler, 8 * 8)
    assert (large > small).all() and (small > 0).all() and (large < 1).all()


@pytest.mark.parametrize("profile", PROFILES)
def test_a_killed_mmdit_run_resumes_to_the_uninterrupted_weights(profile, monkeypatch, tmp_path, cache_uri):
    """Flow matching's draws (noise, levels) resume with the run: killed after checkpoint 2 of 4 and
    rerun, the transformer is bit for bit the one an uninterrupted run publishes."""
    from safetensors.torch import load_file

    settings = [f"storage.root={tmp_path}", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2"]
    config = load_config(profile, settings)
    straight = train_run(config, cache_uri, str(tmp_path / "straight"))
    resumed = resume_after_kill(monkeypatch, config, cache_uri, str(tmp_path / "resumed"), 2)
    ours, theirs = (load_file(str(Path(result.unet_uri) / "diffusion_pytorch_model.safetensors"))
                    for result in (resumed, straight))
    assert Path(straight.unet_uri).name == "transformer" and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
