"""SDXL through every stage, offline: the tiny-xl profile (configs/models/tiny-xl) and the real-weight checks."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tokencompose_core import train as train_module
from tokencompose_core.attention import AttentionCapture, supervised_groups
from tokencompose_core.conditioning import encode_text
from tokencompose_core.config import load_config
from tokencompose_core.data import Batch, GroundingDataset
from tokencompose_core.losses import grounding_losses
from tokencompose_core.models import (MissingWeightsError, clip_tokenizer, clip_tokenizer_2, fingerprint,
                                      load_diffusion, resolve_diffusion_dir)
from tokencompose_core.sampling import Prompt, sample
from tokencompose_core.text import token_positions

# Captions with the spans stage 1 hands on: compound nouns, repeats, hyphens, punctuation.
CAPTIONS = [
    ("A teddy bear sits next to a wine glass on a table.", ["teddy bear", "wine glass", "table"]),
    ("Two dogs and a dog-sled near the dogs' house", ["dogs", "dog-sled", "house"]),
    ("a photo of a giraffe, a zebra, a toothbrush, a hair drier, and a refrigerator.",
     ["giraffe", "zebra", "toothbrush", "hair drier", "refrigerator"]),
    ("An astronaut holding a flag.", ["astronaut", "flag"]),
]


@pytest.fixture(scope="module")
def xl_dir() -> str:
    return resolve_diffusion_dir(load_config("tiny-xl").models)


def test_both_tokenizers_give_the_same_token_positions() -> None:
    import open_clip

    first, second = clip_tokenizer(), clip_tokenizer_2()
    assert (second.pad_token, second.pad_token_id, first.pad_token) == ("!", 0, "<|endoftext|>")
    for caption, nouns in CAPTIONS:
        ids_1 = first(caption, padding="max_length", max_length=77).input_ids
        ids_2 = second(caption, padding="max_length", max_length=77).input_ids
        # OpenCLIP's own bigG tokenizer (from its wheel's BPE) is what SDXL's tokenizer_2 reproduces.
        assert ids_2 == open_clip.tokenize([caption])[0].tolist()
        length = ids_1.index(first.eos_token_id) + 1
        assert ids_1[:length] == ids_2[:length] and set(ids_2[length:]) == {0}
        for noun in nouns:
            positions = list(token_positions(caption, noun, first))
            assert positions and positions == list(token_positions(caption, noun, second)), noun


def test_tiny_xl_is_sdxl_shaped_and_the_fingerprint_covers_its_second_encoder(xl_dir, tmp_path, monkeypatch) -> None:
    parts = load_diffusion(xl_dir)
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert parts.force_zeros_for_empty_prompt and parts.unet.config.addition_embed_type == "text_time"
    hidden = parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    assert parts.unet.config.cross_attention_dim == hidden
    # Cross-attention at the two coarser sides only; up blocks with 2 transformer layers per attention.
    groups = supervised_groups(parts.unet, ["down", "mid", "up"], 8)
    assert {name: len(layers) for name, layers in groups.items()} == \
        {"down_4": 1, "down_2": 2, "mid_2": 2, "up_2": 4, "up_4": 2}

    configs = Path(__file__).resolve().parents[1] / "configs"
    copy = tmp_path / "configs"
    shutil.copytree(configs, copy)
    models = load_config("tiny-xl").models
    before = fingerprint(models)
    encoder = copy / "models" / "tiny-xl" / "text_encoder_2" / "config.json"
    encoder.write_text(encoder.read_text().replace('"projection_dim": 32', '"projection_dim": 16'))
    monkeypatch.setenv("TOKENCOMPOSE_CONFIGS", str(copy))
    assert fingerprint(models) != before


# SDXL base 1.0's U-Net hyper-parameters (its unet/config.json), built on the meta device: no weights.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], use_linear_projection=True, cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize(("name", "config", "expected"), [
    ("sdxl", SDXL_UNET, {"mid_32": 10, "up_32": 30, "up_64": 6}),
    # SD 1.5 and SD 1.4 share one architecture; the sd15 profile changes only the weights.
    ("sd15", "sd14-random", {"mid_8": 1, "up_16": 3, "up_32": 3, "up_64": 3}),
])
def test_full_size_groups_and_profiles(name, config, expected) -> None:
    from diffusers import UNet2DConditionModel

    if isinstance(config, str):
        config = json.loads((Path(__file__).resolve().parents[1] / "configs" / "models" / config / "unet" /
                             "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    profile = load_config(name)
    groups = supervised_groups(unet, list(profile.train.grounding.layers), profile.train.resolution // 8)
    assert {group: len(layers) for group, layers in groups.items()} == expected
    assert profile.train.grounding.normalize_by_layers == (name == "sdxl")


def test_real_sdxl_folder_without_second_encoder_weights_names_the_file(xl_dir, tmp_path) -> None:
    folder = tmp_path / "sdxl"
    shutil.copytree(xl_dir, folder)
    for weights in (folder / "text_encoder_2").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(MissingWeightsError, match="text_encoder_2/model.safetensors"):
        load_diffusion(str(folder))
    shutil.rmtree(folder / "text_encoder_2")
    models = load_config("sdxl", [f"models.diffusion={folder}"]).models
    with pytest.raises(MissingWeightsError, match="text_encoder_2/config.json"):
        resolve_diffusion_dir(models)
    with pytest.raises(MissingWeightsError, match="stable-diffusion-xl-base-1.0"):
        resolve_diffusion_dir(load_config("sdxl").models)  # nothing in the offline cache


def test_data_path_records_the_crop_as_add_time_ids() -> None:
    dataset = GroundingDataset(None, [], resolution=64, mask_size=8)
    # 200 x 100 (w x h): scaled to 128 x 64, the centre square starts 32 px in.
    assert dataset._time_ids(200, 100) == [100, 200, 0, 32, 64, 64]
    assert dataset._time_ids(64, 64) == [64, 64, 0, 0, 64, 64]


def _batch(time_ids: torch.Tensor | None) -> Batch:
    masks = torch.zeros(2, 2, 8, 8, dtype=torch.uint8)
    masks[:, 0, :4, :4] = 1
    masks[:, 1, 4:, 4:] = 1
    caption = "a photo of a teddy bear and a wine glass"
    positions = [token_positions(caption, noun, clip_tokenizer()) for noun in ("teddy bear", "wine glass")]
    padded = torch.full((2, 2, 2), -1, dtype=torch.long)
    for index, noun in enumerate(positions):
        padded[:, index, : len(noun)] = torch.tensor(list(noun))
    return Batch(torch.rand(2, 3, 64, 64) * 2 - 1, [caption, caption], masks, padded, time_ids)


def test_training_step_passes_add_time_ids_and_grounding_losses_have_gradients(xl_dir) -> None:
    config = load_config("tiny-xl")
    parts = load_diffusion(xl_dir)
    groups = train_module._groups(parts.unet, config.train, 8)
    assert set(groups) == {"mid_2", "up_2", "up_4"}
    seen: list[dict] = []
    parts.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    model = train_module._Model(
        denoiser=parts.unet, vae=parts.vae, latent_scaling=parts.latent_scaling,
        embed=train_module.TextEmbedder(partial(encode_text, parts.text_encoders), cache=True),
        noise_scheduler=parts.scheduler,
        capture=AttentionCapture(parts.unet, groups), group_weights={}, token_weight=1.0, pixel_weight=1.0,
        caption_dropout=0.0, weight_dtype=torch.float32, normalize_by_layers=True,
    )
    recorded = torch.tensor([[100.0, 200.0, 0.0, 32.0, 64.0, 64.0]] * 2)
    for time_ids, expected in ((recorded, recorded), (None, torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))):
        generator = torch.Generator().manual_seed(0)
        losses = train_module.step_losses(model, _batch(time_ids), generator, torch.device("cpu"))
        added = seen[-1]["added_cond_kwargs"]
        assert torch.equal(added["time_ids"], expected) and added["text_embeds"].shape == (2, 32)
        assert seen[-1]["encoder_hidden_states"].shape == (2, 77, 64)
    grounding = sum(value for key, value in losses.items() if key.startswith(("token/", "pixel/")))
    assert all(torch.isfinite(value) for value in losses.values())
    parts.unet.zero_grad()
    grounding.backward()
    grads = [p.grad.abs().sum() for name, p in parts.unet.named_parameters()
             if "attn2.to_k" in name and p.grad is not None]
    assert grads and sum(grads) > 0


def test_normalising_by_layer_count_turns_the_group_sum_into_a_mean() -> None:
    torch.manual_seed(0)
    layers = [torch.rand(1, 2, 16, 77).softmax(-1) for _ in range(4)]
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2, :2] = 1
    positions = torch.tensor([[[3, 4]]])
    summed, pixel = grounding_losses(layers, masks, positions)
    mean, same_pixel = grounding_losses(layers, masks, positions, normalize_by_layers=True)
    assert torch.allclose(mean * 4, summed) and torch.equal(pixel, same_pixel)
    single, _ = grounding_losses(layers[:1], masks, positions, normalize_by_layers=True)
    assert torch.allclose(single, grounding_losses(layers[:1], masks, positions)[0])


def test_sampling_tiny_xl_makes_images_with_zeroed_unconditional(xl_dir, tmp_path) -> None:
    config = load_config("tiny-xl", ["sample.images_per_prompt=2", "sample.batch_size=2",
                                     "sample.num_inference_steps=2", "sample.device=cpu"])
    index = sample(config.sample, config.models, xl_dir, str(tmp_path / "samples"),
                   [Prompt(0, "a photo of a cat and a dog")])
    images = [np.asarray(Image.open(uri)) for uri in pd.read_parquet(index).image_uri]
    assert len(images) == 2 and all(image.shape == (64, 64, 3) for image in images)
    assert not np.array_equal(images[0], images[1])  # seeded per image


def test_our_sampling_loop_matches_stable_diffusion_xl_pipeline(xl_dir) -> None:
    from diffusers import StableDiffusionXLPipeline

    from tokencompose_core.sampling import (build_scheduler, decode_images, denoise, encode_prompts,
                                            initial_noise, load_parts, unconditional)

    parts = load_parts(xl_dir, None, torch.device("cpu"), torch.float32)
    prompts, seeds = ["a photo of a cat and a dog", "a red car"], [1, 2]
    noise = initial_noise(seeds, (4, 8, 8), torch.device("cpu"), torch.float32)
    ours = decode_images(parts, denoise(parts, build_scheduler("euler", parts.scheduler.config), noise,
                                        encode_prompts(parts, prompts), unconditional(parts).expand(2), 3.0, 2,
                                        [torch.Generator().manual_seed(s) for s in seeds]))
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                     text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                     tokenizer_2=parts.tokenizer_2, unet=parts.unet,
                                     scheduler=build_scheduler("euler", parts.scheduler.config),
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                  latents=noise.clone(), output_type="np").images
    assert np.abs(ours.astype(float) - theirs * 255).max() <= 1.0


@pytest.mark.slow
def test_tiny_xl_pipeline_through_the_cli(prefect_harness, tmp_path, capsys) -> None:
    from flows.cli import main
    from helpers import PIPELINE_SETTINGS, photo_manifest

    manifest = photo_manifest(tmp_path)
    assert main(["run", "-p", "tiny-xl", "--input", manifest, f"storage.root={tmp_path / 'root'}", *PIPELINE_SETTINGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["stages"]) == {"nouns", "masks", "train", "sample", "score"}
    (scores,) = summary["stages"]["score"]["summary"]["scores"]
    segmentation = json.loads(Path(scores, "segmentation.json").read_text())
    # Attention mIoU on tiny-xl's cross-attention: the groups of its mid and up blocks.
    assert set(segmentation["groups"]) == {"mid_2", "up_2", "up_4"}
    assert all(group["nouns"] > 0 for group in segmentation["groups"].values())
    assert Path(summary["stages"]["train"]["output_uri"], "unet", "config.json").is_file()
    assert Path(summary["stages"]["score"]["output_uri"], "report.md").is_file()
