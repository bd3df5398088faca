"""Supervised layer groups from the model, and the in-graph attention capture."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from tokencompose_core.attention import AttentionCapture, CaptureAttnProcessor, supervised_groups
from tokencompose_core.losses import grounding_losses

SD14_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,
        cross_attention_dim=32,
    )


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 77, 32, generator=generator)
    return sample, torch.tensor([10, 500][:batch]), text


@pytest.mark.parametrize("sample_size, sides", [(64, (8, 16, 32, 64)), (96, (12, 24, 48, 96))])
def test_sd_groups_are_derived_from_the_model(sample_size, sides):
    with init_empty_weights():  # structure only, no 3 GB of weights
        unet = UNet2DConditionModel(sample_size=sample_size, **SD14_BLOCKS)
    groups = supervised_groups(unet, ["mid", "up"], sample_size)
    mid, *ups = sides
    assert set(groups) == {f"mid_{mid}", *(f"up_{side}" for side in ups)}
    assert len(groups[f"mid_{mid}"]) == 1 and all(len(groups[f"up_{s}"]) == 3 for s in ups)
    assert sum(len(names) for names in groups.values()) == 10  # METHOD.md: 10 cross-attention layers
    assert all(name.endswith("attn2") for names in groups.values() for name in names)
    down = supervised_groups(unet, ["down"], sample_size)
    assert set(down) == {f"down_{side}" for side in (sample_size, sample_size // 2, sample_size // 4)}
    with pytest.raises(ValueError, match="unknown"):
        supervised_groups(unet, ["middle"], sample_size)


def test_capture_matches_sdpa_and_keeps_probabilities_in_the_graph():
    unet = _tiny_unet()
    sample, timesteps, text = _inputs()
    with torch.no_grad():
        reference = unet(sample, timesteps, text).sample
    groups = supervised_groups(unet, ["mid", "up"], 8)
    assert set(groups) == {"mid_2", "up_4", "up_8"}
    capture = AttentionCapture(unet, groups)
    supervised = {name for names in groups.values() for name in names}
    for name, module in unet.attn_processors.items():
        expected = CaptureAttnProcessor if name.removesuffix(".processor") in supervised else AttnProcessor2_0
        assert isinstance(module, expected), name

    out = unet(sample, timesteps, text).sample
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    maps = capture.maps()
    modules = dict(unet.named_modules())
    for group, layers in maps.items():
        side = int(group.split("_")[1])
        for name, probs in zip(groups[group], layers):
            assert probs.shape == (2, modules[name].heads, side * side, 77)
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
            assert probs.requires_grad
    masks = (torch.rand(2, 2, 8, 8) > 0.5).to(torch.uint8)
    positions = torch.tensor([[[1, 2], [4, -1]], [[3, -1], [-1, -1]]])
    token, pixel = grounding_losses(maps["up_8"], masks, positions)
    (token + pixel).backward()
    down_grad = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight.grad
    assert down_grad is not None and down_grad.abs().sum() > 0  # flows upstream of the supervised layers

    capture.remove()
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_gradient_checkpointing_gives_same_gradients_and_no_duplicate_maps():
    sample, timesteps, text = _inputs()
    masks = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).to(torch.uint8)
    positions = torch.tensor([[[1, 2]], [[3, -1]]])
    grads = []
    for checkpointing in (False, True):
        unet = _tiny_unet().train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        groups = supervised_groups(unet, ["mid", "up"], 8)
        with AttentionCapture(unet, groups) as capture:
            out = unet(sample, timesteps, text).sample
            loss = out.pow(2).mean()
            for layers in capture.maps().values():
                token, pixel = grounding_losses(layers, masks, positions)
                loss = loss + token + pixel
            loss.backward()
            # The recompute during backward replaced entries; it never added any.
            assert len(capture._store) == sum(len(names) for names in groups.values())
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
