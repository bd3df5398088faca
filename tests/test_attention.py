"""Supervised layer groups from the model, and the in-graph attention capture."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from tokencompose_core.attention import AttentionCapture, CaptureAttnProcessor, column_probabilities, supervised_groups
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
    return sample, torch.tensor([10, 500, 900][:batch]), text


@pytest.mark.parametrize("sample_size, sides", [(64, (8, 16, 32, 64)), (96, (12, 24, 48, 96))])
def test_sd_groups_are_derived_from_the_model(sample_size, sides):
    with init_empty_weights():  # structure only, no 3 GB of weights
        unet = UNet2DConditionModel(sample_size=sample_size, **SD14_BLOCKS)
    groups = supervised_groups(unet, ["mid", "up"], sample_size)
    mid, *ups = sides
    assert set(groups) == {f"mid_{mid}", *(f"up_{side}" for side in ups)}
    assert len(groups[f"mid_{mid}"]) == 1 and all(len(groups[f"up_{s}"]) == 3 for s in ups)
    assert sum(len(names) for names in groups.values()) == 10  # docs/METHOD.md: 10 cross-attention layers
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
            within = capture.capture_tokens(positions)  # the training step's path
            out = unet(sample, timesteps, text).sample
            loss = out.pow(2).mean()
            for layers in capture.maps().values():
                token, pixel = grounding_losses(layers, masks, within)
                loss = loss + token + pixel
            loss.backward()
            # The recompute during backward replaced entries; it never added any.
            assert len(capture.store) == sum(len(names) for names in groups.values())
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _grounding_loss_and_grads(columns: bool, positions: torch.Tensor, masks: torch.Tensor):
    unet = _tiny_unet().train()
    sample, timesteps, text = _inputs(positions.shape[0])
    with AttentionCapture(unet, supervised_groups(unet, ["mid", "up"], 8)) as capture:
        used = capture.capture_tokens(positions) if columns else positions
        loss = unet(sample, timesteps, text).sample.pow(2).mean()
        maps = capture.maps()
        for layers in maps.values():
            token, pixel = grounding_losses(layers, masks, used)
            loss = loss + token + pixel
        loss.backward()
    width = maps["up_8"][0].shape[-1]
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}, width


def test_capturing_only_the_noun_columns_gives_the_same_losses_and_gradients():
    # Two-token and one-token nouns, padding, and a sample with no grounded noun.
    positions = torch.tensor([[[1, 2], [5, -1]], [[-1, -1], [-1, -1]], [[3, -1], [7, 8]]])
    masks = (torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).to(torch.uint8)
    full_loss, full_grads, full_width = _grounding_loss_and_grads(False, positions, masks)
    loss, grads, width = _grounding_loss_and_grads(True, positions, masks)
    assert (full_width, width) == (77, 4)  # N * K columns instead of the 77 tokens
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_column_positions_point_at_the_same_tokens():
    unet = _tiny_unet()
    positions = torch.tensor([[[4, 5], [9, -1]], [[-1, -1], [2, -1]]])
    capture = AttentionCapture(unet, supervised_groups(unet, ["up"], 8))
    within = capture.capture_tokens(positions)
    assert within.tolist() == [[[0, 1], [2, -1]], [[-1, -1], [2, -1]]]
    picked = torch.gather(capture.columns, 1, within.clamp(min=0).flatten(1)).view_as(positions)
    assert torch.equal(picked[positions >= 0], positions[positions >= 0])
    assert capture.capture_tokens(None) is None and capture.columns is None
    capture.remove()


def test_column_probabilities_have_exact_gradients():
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    key = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    mask = torch.zeros(2, 3, 5, 7, dtype=torch.float64)
    mask[..., -1] = -1e4  # a masked-out token
    columns = torch.tensor([[1, 4, 4, 0], [6, 2, 3, 3]])  # repeats: padded positions point at one column

    def reference(q, k):
        probs = ((q @ k.transpose(-1, -2)) * 0.5 + mask).softmax(-1)
        return probs.gather(-1, columns[:, None, None, :].expand(2, 3, 5, 4))

    torch.testing.assert_close(column_probabilities(query, key, 0.5, columns, mask).double(), reference(query, key))
    weights = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator)
    ours = torch.autograd.grad((column_probabilities(query, key, 0.5, columns, mask) * weights).sum(), (query, key))
    expected = torch.autograd.grad((reference(query, key) * weights).sum(), (query, key))
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
