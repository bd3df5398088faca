"""grounding_losses against a plain loop over samples, layers, nouns, tokens and heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokencompose_core.losses import grounding_losses


def _loop_mask(mask: torch.Tensor, side: int) -> torch.Tensor:
    resized = F.interpolate(mask[None, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    return (resized[0, 0] > 0).flatten()


def _loop_sample(layers: list[torch.Tensor], masks: list[torch.Tensor], positions: list[list[int]]):
    """docs/METHOD.md section 2 for one sample: layers are (heads, HW, T); None when no noun is grounded."""
    nouns = [(mask, tokens) for mask, tokens in zip(masks, positions) if tokens]
    if not nouns:
        return None
    heads, pixels, _ = layers[0].shape
    side = int(pixels**0.5)
    token_loss = 0.0
    for attn in layers:
        layer_loss = 0.0
        for mask, tokens in nouns:
            inside = _loop_mask(mask, side)
            noun_loss = 0.0
            for t in tokens:
                r = 0.0
                for h in range(heads):
                    r = r + attn[h, :, t][inside].sum() / attn[h, :, t].sum()
                noun_loss = noun_loss + (1 - r / heads) ** 2
            layer_loss = layer_loss + noun_loss / len(tokens)
        token_loss = token_loss + layer_loss / len(nouns)
    mean_map = sum(attn.mean(0) for attn in layers) / len(layers)
    pixel_loss = 0.0
    for mask, tokens in nouns:
        target = _loop_mask(mask, side).float()
        summed = sum(mean_map[:, t] for t in tokens)
        bce = -(target * torch.log(summed) + (1 - target) * torch.log(1 - summed))
        pixel_loss = pixel_loss + bce.mean()
    return token_loss, pixel_loss / len(nouns)


def _loop_batch(layers, masks, positions):
    """Mean over the samples that have at least one grounded noun."""
    per_sample = [
        _loop_sample([layer[b] for layer in layers], masks[b], positions[b]) for b in range(layers[0].shape[0])
    ]
    kept = [value for value in per_sample if value is not None]
    if not kept:
        return torch.tensor(0.0), torch.tensor(0.0)
    return sum(v[0] for v in kept) / len(kept), sum(v[1] for v in kept) / len(kept)


def _pad(positions: list[list[list[int]]]) -> torch.Tensor:
    nouns = max(1, max(len(sample) for sample in positions))
    width = max(1, max((len(tokens) for sample in positions for tokens in sample), default=1))
    out = torch.full((len(positions), nouns, width), -1, dtype=torch.long)
    for b, sample in enumerate(positions):
        for i, tokens in enumerate(sample):
            out[b, i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def _case(batch, positions, side=8, mask_side=32, heads=4, tokens=12, layers=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = [
        torch.randn(batch, heads, side * side, tokens, generator=generator, requires_grad=True) for _ in range(layers)
    ]
    nouns = max(1, max(len(sample) for sample in positions))
    masks = (torch.rand(batch, nouns, mask_side, mask_side, generator=generator) > 0.6).to(torch.uint8)
    return logits, masks


def _check(positions, **kwargs):
    logits, masks = _case(len(positions), positions, **kwargs)
    probs = [layer.softmax(-1) for layer in logits]
    token, pixel = grounding_losses(probs, masks, _pad(positions))
    mask_lists = [[masks[b, i] for i in range(len(positions[b]))] for b in range(len(positions))]
    ref_token, ref_pixel = _loop_batch(probs, mask_lists, positions)
    torch.testing.assert_close(token, ref_token, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pixel, ref_pixel, rtol=1e-5, atol=1e-6)
    return logits, probs, masks, token, pixel, ref_token, ref_pixel


def test_single_sample_matches_formulas():
    _check([[[1], [3, 4], [7]]])


def test_batch_multi_token_padding_and_sample_without_nouns():
    # Sample 1 has no grounded noun; sample 2 has a noun with no positions (ignored).
    _check([[[2, 3, 4], [6]], [], [[1], [], [5, 9]]], side=4, mask_side=20, layers=3)


def test_gradients_match_the_loop():
    positions = [[[1, 2], [5]], [[3], [4, 6, 7]]]
    logits, _, _, token, pixel, ref_token, ref_pixel = _check(positions, layers=2)
    ours = torch.autograd.grad(token + 10 * pixel, logits, retain_graph=True)
    reference = torch.autograd.grad(ref_token + 10 * ref_pixel, logits)
    for mine, theirs in zip(ours, reference):
        assert mine.abs().sum() > 0
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)


def test_no_grounded_noun_gives_zero_with_graph():
    logits, masks = _case(2, [[], []])
    probs = [layer.softmax(-1) for layer in logits]
    token, pixel = grounding_losses(probs, masks, torch.full((2, 1, 1), -1))
    assert token.item() == 0 and pixel.item() == 0
    (token + pixel).backward()  # attached to the graph: DDP and backward stay uniform


def test_attention_inside_the_mask_gives_zero_token_loss():
    side, tokens = 4, 6
    mask = torch.zeros(1, 1, side, side)
    mask[..., :2, :] = 1
    probs = torch.full((1, 2, side * side, tokens), 1.0 / tokens)
    inside = mask.flatten()[None, None, :].bool()
    probs[..., 2] = torch.where(inside, 1.0, 0.0)  # token 2 only looks inside its mask
    token, _ = grounding_losses([probs], mask, torch.tensor([[[2]]]))
    assert token.item() < 1e-7


def test_fp32_under_bf16_autocast():
    positions = [[[1], [2, 3]]]
    logits, masks = _case(1, positions)
    probs = [layer.softmax(-1).to(torch.bfloat16) for layer in logits]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token, pixel = grounding_losses(probs, masks, _pad(positions))
    assert token.dtype == torch.float32 and pixel.dtype == torch.float32
    ref_token, ref_pixel = grounding_losses([p.float() for p in probs], masks, _pad(positions))
    torch.testing.assert_close(token, ref_token)
    torch.testing.assert_close(pixel, ref_pixel)
