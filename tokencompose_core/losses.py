"""The token and pixel grounding losses of TokenCompose (docs/METHOD.md section 2, per layer group).

For one group of cross-attention layers at one resolution:

* token loss: for every layer, noun i and token t of the noun,
  r = head-mean of sum_{u in M_i} A_t(u) / sum_u A_t(u); the layer's loss is
  (1/N) sum_i (1/|T_i|) sum_t (1 - r)^2; the group's loss sums the layers
  (the paper) or, with ``normalize_by_layers``, averages them, so that a group of
  many layers (SDXL's up_32: 30) weighs as much as a group of one;
* pixel loss: A averaged over heads and layers, summed over the noun's tokens,
  against the mask with binary cross-entropy (mean over pixels, then over nouns).

Batches: every sample gets the formulas above with its own nouns; the batch loss
is the mean over samples with at least one grounded noun (0 when there is none).
Nouns and tokens are handled with gathers and einsums, never a Python loop, and
all maths runs in fp32 even inside an autocast region.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, H0, W0) {0,1} masks -> float {0,1} at ``size``: bilinear, then > 0."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    return (masks > 0).float()


def _grid(num_pixels: int, mask_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a flattened attention map, from the masks' aspect ratio."""
    height = round(math.sqrt(num_pixels * mask_size[0] / mask_size[1]))
    width = num_pixels // max(height, 1)
    if height * width != num_pixels:
        raise ValueError(f"cannot lay out {num_pixels} attention pixels with aspect {mask_size}")
    return height, width


def _mean_over_grounded(per_noun: torch.Tensor, grounded: torch.Tensor) -> torch.Tensor:
    """(B, N) per-noun losses -> mean over grounded nouns, then over samples that have one."""
    weight = grounded.float()
    per_sample = (per_noun * weight).sum(-1) / weight.sum(-1).clamp(min=1)
    has_noun = grounded.any(-1).float()
    return (per_sample * has_noun).sum() / has_noun.sum().clamp(min=1)


def _select(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, heads, HW, T) -> (B, heads, HW, N, K): only the nouns' token columns.

    Both losses read nothing else, so the backward pass builds one dense
    gradient per layer (the gather's) instead of one per loss.
    """
    batch, heads, pixels, _ = probs.shape
    nouns, width = index.shape[1:]
    flat = index.reshape(batch, 1, 1, nouns * width).expand(batch, heads, pixels, nouns * width)
    return probs.gather(3, flat).view(batch, heads, pixels, nouns, width)


def _token_loss(selected: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One layer. selected (B, heads, HW, N, K); masks (B, N, HW); valid (B, N, K)."""
    inside = torch.einsum("bhunk,bnu->bhnk", selected, masks)
    ratio = (inside / selected.sum(2)).mean(1)  # (B, N, K): head-mean of the in-mask share
    error = (1 - ratio).pow(2) * valid
    per_noun = error.sum(-1) / valid.sum(-1).clamp(min=1)
    return _mean_over_grounded(per_noun, valid.any(-1))


def _pixel_loss(mean_map: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean_map (B, HW, N, K): selected columns averaged over heads and layers; masks (B, N, HW)."""
    # A sum of distinct softmax entries is <= 1 up to rounding; BCE needs [0, 1].
    noun_map = (mean_map * valid[:, None]).sum(-1).transpose(1, 2).clamp(0.0, 1.0)  # (B, N, HW)
    per_noun = F.binary_cross_entropy(noun_map, masks, reduction="none").mean(-1)
    return _mean_over_grounded(per_noun, valid.any(-1))


def grounding_losses(
    attn_probs: list[torch.Tensor], masks: torch.Tensor, token_positions: torch.Tensor,
    normalize_by_layers: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_loss, pixel_loss) of one resolution group.

    attn_probs: the group's layers, each (B, heads, H*W, T) softmax probabilities;
    masks: (B, N, H0, W0) in {0, 1} at any resolution (resized here);
    token_positions: (B, N, K) long, padded with -1; a noun without positions is
    not grounded. normalize_by_layers: the token loss is the layers' mean instead of their sum.
    """
    if not attn_probs:
        raise ValueError("grounding_losses needs at least one attention map")
    device = attn_probs[0].device
    with torch.autocast(device_type=device.type, enabled=False):
        positions = token_positions.to(device=device, dtype=torch.long)
        valid = positions >= 0
        if not valid.any():  # nothing grounded: zero, still attached to the graph
            zero = sum(layer.float().sum() for layer in attn_probs) * 0.0
            return zero, zero.clone()
        size = _grid(attn_probs[0].shape[2], tuple(masks.shape[-2:]))
        flat_masks = resize_masks(masks.to(device), size).flatten(2)
        # Gathering is exact, so casting only the selected columns to fp32 loses nothing.
        selected = [_select(layer, positions.clamp(min=0)).float() for layer in attn_probs]
        per_layer = torch.stack([_token_loss(layer, flat_masks, valid) for layer in selected])
        token = per_layer.mean() if normalize_by_layers else per_layer.sum()
        pixel = _pixel_loss(torch.stack([layer.mean(1) for layer in selected]).mean(0), flat_masks, valid)
    return token, pixel
