"""CUDA checks, run by bench/gpu_check.sh on a lent GPU; skipped elsewhere.

They cover what the CPU suite cannot: autocast precision of the losses, the
capture processor under bf16 with a backward pass, seeded sampling on the GPU,
and the Grounded-SAM models under mixed precision. Nothing here imports Prefect
(the GPU machine has none).
"""

from __future__ import annotations

import pytest
import torch

from tokencompose_core.attention import AttentionCapture, supervised_groups
from tokencompose_core.config import ModelsConfig, load_config
from tokencompose_core.losses import grounding_losses
from tokencompose_core.models import load_diffusion, load_grounding_dino, load_sam, resolve_diffusion_dir

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _random_case(batch: int = 2, heads: int = 4, side: int = 16, nouns: int = 3):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, heads, side * side, 77, generator=generator)
    probs = [logits.softmax(-1), (logits * 0.5).softmax(-1)]
    masks = (torch.rand(batch, nouns, 64, 64, generator=generator) > 0.6).float()
    positions = torch.tensor([[[1, 2], [4, -1], [-1, -1]], [[3, -1], [-1, -1], [-1, -1]]])
    return probs, masks, positions


def test_losses_are_fp32_and_match_cpu_under_bf16_autocast() -> None:
    probs, masks, positions = _random_case()
    cpu_token, cpu_pixel = grounding_losses(probs, masks, positions)
    cuda_probs = [p.cuda().bfloat16() for p in probs]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        token, pixel = grounding_losses(cuda_probs, masks.cuda(), positions.cuda())
    assert token.dtype == torch.float32 and pixel.dtype == torch.float32
    # Inputs were rounded to bf16 (8 bits of mantissa); the maths after that is fp32.
    torch.testing.assert_close(token.cpu(), cpu_token, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(pixel.cpu(), cpu_pixel, rtol=2e-2, atol=1e-3)


def test_grounded_step_backpropagates_under_bf16() -> None:
    models = load_config("tiny").models
    parts = load_diffusion(resolve_diffusion_dir(models), device="cuda")
    unet = parts.unet.train()
    latent_side = parts.sample_size // parts.vae_scale_factor
    groups = supervised_groups(unet, ["mid", "up"], latent_side)
    assert len(groups) >= 2, groups
    tokens = parts.tokenizer(["a photo of a cat and a dog"] * 2, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        text = parts.text_encoder.cuda()(tokens)[0]
    latents = torch.randn(2, parts.latent_channels, latent_side, latent_side, device="cuda")
    timesteps = torch.tensor([10, 500], device="cuda")
    masks = (torch.rand(2, 2, 64, 64, device="cuda") > 0.5).float()
    positions = torch.tensor([[[4], [7]], [[4], [-1]]], device="cuda")
    with AttentionCapture(unet, groups) as capture, torch.autocast("cuda", dtype=torch.bfloat16):
        prediction = unet(latents, timesteps, encoder_hidden_states=text).sample
        losses = [grounding_losses(maps, masks, positions) for maps in capture.maps().values()]
        total = prediction.float().pow(2).mean() + sum(t + p for t, p in losses)
    total.backward()
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_tiny_grounded_sam_runs_under_fp16_autocast() -> None:
    models = ModelsConfig()
    dino = load_grounding_dino(models, device="cuda").eval()
    sam = load_sam(models, device="cuda").eval()
    image = torch.rand(1, 3, 128, 128, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        outputs = dino(image, captions=["cat . dog ."])
        embedding = sam.image_encoder(torch.rand(1, 3, sam.image_encoder.img_size,
                                                 sam.image_encoder.img_size, device="cuda"))
    assert outputs["pred_boxes"].shape[-1] == 4
    assert torch.isfinite(outputs["pred_logits"].float()).all()
    assert torch.isfinite(embedding.float()).all()


def test_seeded_sampling_on_cuda_regenerates_one_image_alone(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from tokencompose_core import storage
    from helpers import sample_run
    from tokencompose_core.sampling import load_prompts

    steps = ["sample.num_inference_steps=3", "sample.scheduler=ddim", "sample.device=cuda",
             "sample.mixed_precision=fp16", "sample.images_per_prompt=2", "sample.batch_size=4"]
    config = load_config("tiny", steps)
    model_dir = resolve_diffusion_dir(config.models)
    prompts = load_prompts("multigen:coco", max_prompts=2)
    index = storage.read_parquet(sample_run(config, model_dir, str(tmp_path / "all"), prompts))
    alone = storage.read_parquet(sample_run(config, model_dir, str(tmp_path / "alone"), prompts[1:]))
    wanted = index[(index.prompt_id == prompts[1].prompt_id) & (index.image_index == 1)].iloc[0]
    got = alone[alone.image_index == 1].iloc[0]
    assert got.seed == wanted.seed
    first, second = (np.asarray(Image.open(uri)).astype(np.int16) for uri in (wanted.image_uri, got.image_uri))
    assert np.abs(first - second).max() <= 1
