"""The paper profiles against the reference recipe: masks, losses, data transforms.

The reference's mask path is transcribed here from its description (masks
saved as grey images with matplotlib, torchvision ``Resize`` + ``CenterCrop`` +
``ToTensor`` for the R x R mask, divided by its maximum; per layer a tensor
``Resize`` without antialias and ``> 0``; then the token and pixel losses as
plain loops over nouns and tokens) and compared with ``training_mask`` +
``grounding_losses``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tokencompose_core.data import GroundingDataset, collate, training_mask
from tokencompose_core.losses import grounding_losses
from tokencompose_core.mask_cache import MaskCache


def _thin_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blobs plus one- and two-pixel lines: the parts resampling treats differently."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(3):
        y, x = rng.integers(0, height - 60), rng.integers(0, width - 80)
        mask[y : y + rng.integers(10, 60), x : x + rng.integers(10, 80)] = True
    mask[height // 3, :] = True
    mask[:, width // 2 : width // 2 + 2] = True
    return mask


def _their_mask(mask: np.ndarray, resolution: int) -> torch.Tensor:
    """The reference: plt.imsave(gray) -> PIL -> Resize(R), CenterCrop(R), ToTensor -> channel 0 / max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.cm as cm
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.imsave(buffer, mask, cmap=cm.gray, format="png")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    transform = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
    ])
    tensor = transform(image)
    if tensor.shape[0] == 4:
        tensor = tensor[0].unsqueeze(0)
    return tensor / tensor.max() if tensor.max() > 0 else tensor


def _their_losses(masks: list[torch.Tensor], tokens: list[list[int]], res: int, layers: list[torch.Tensor]):
    """The reference's per-group loss for one sample; layers are (heads, res, res, T) probabilities."""
    resize = transforms.Resize((res, res), antialias=False)  # their torchvision did not antialias tensors
    segs = [(resize(mask).squeeze(0) > 0.0).float() for mask in masks]
    token_loss = 0.0
    for attn in layers:
        heads = attn.shape[0]
        for noun_tokens, seg in zip(tokens, segs):
            noun_loss = 0.0
            for t in noun_tokens:
                column = attn[..., t].reshape(heads, res, res)
                share = (column * seg).reshape(heads, -1).sum(-1) / column.reshape(heads, -1).sum(-1)
                noun_loss += (1.0 - share.mean()) ** 2
            token_loss += noun_loss / len(noun_tokens)
    token_loss = token_loss / len(tokens)
    mean_map = torch.stack([attn.mean(0) for attn in layers]).mean(0)
    pixel_loss = 0.0
    for noun_tokens, seg in zip(tokens, segs):
        summed = torch.stack([mean_map[..., t] for t in noun_tokens]).sum(0)
        pixel_loss += torch.nn.BCELoss()(summed, seg)
    return token_loss, pixel_loss / len(tokens)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (333, 517), (512, 512)])
def test_training_mask_is_the_reference_transform(size):
    mask = _thin_mask(*size)
    ours = training_mask(mask, 512)
    assert ours.shape == (512, 512) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, _their_mask(mask, 512)[0], rtol=0, atol=1e-7)
    assert training_mask(mask.astype(np.uint8), 512).equal(ours)  # bool or 0/1 uint8 alike
    assert training_mask(np.zeros(size, dtype=bool), 64).abs().sum() == 0


@pytest.mark.parametrize("resolution, sides", [(512, (8, 16, 32, 64)), (768, (12, 24, 48, 96))])
def test_training_mask_plus_grounding_losses_equal_the_reference(resolution, sides):
    generator = torch.Generator().manual_seed(1)
    masks = [_thin_mask(480, 640, seed) for seed in (0, 1)]
    tokens = [[2], [4, 5]]
    ours_masks = torch.stack([training_mask(mask, resolution) for mask in masks])[None]
    positions = torch.tensor([[[2, -1], [4, 5]]])
    for side in sides:
        layers = [torch.randn(1, 8, side * side, 77, generator=generator).softmax(-1) for _ in range(2)]
        token, pixel = grounding_losses(layers, ours_masks, positions)
        their_layers = [layer[0].reshape(8, side, side, 77) for layer in layers]
        their_masks = [_their_mask(mask, resolution) for mask in masks]
        ref_token, ref_pixel = _their_losses(their_masks, tokens, side, their_layers)
        torch.testing.assert_close(token, ref_token, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pixel, ref_pixel, rtol=1e-5, atol=1e-6)


def test_dataset_carries_the_reference_images_and_masks(tmp_path):
    from helpers import make_cache

    cache = MaskCache(make_cache(tmp_path, images=3, side=48))
    ids = cache.image_ids()
    reference = GroundingDataset(cache, ids, 32, 4, image_transform="resize_crop_bilinear",
                                 mask_transform="training_resolution")
    latent = GroundingDataset(cache, ids, 32, 4)
    for index, image_id in enumerate(ids):
        grounded = cache.get(image_id)
        example = reference[index]
        assert example["masks"].shape == (len(grounded.nouns), 32, 32)
        for mask, stored in zip(example["masks"], grounded.masks):
            expected = training_mask(stored, 32)
            # The loader's 0..255 masks and the scaled ones have the same sign everywhere.
            assert torch.equal(mask > 0, expected > 0)
        image = Image.open(grounded.image_uri).convert("RGB")
        expected_pixels = transforms.Compose([
            transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(32),
            transforms.PILToTensor(),
        ])(image)
        assert torch.equal(example["pixels"], expected_pixels)
        assert latent[index]["masks"].shape[-2:] == (4, 4)
    batch = collate([reference[0], reference[1]])
    assert batch.masks.shape[-2:] == (32, 32) and batch.masks.dtype == torch.uint8
    with pytest.raises(ValueError, match="unknown transforms"):
        GroundingDataset(cache, ids, 32, 4, mask_transform="nearest")


def _reproducing_rows() -> list[tuple[str, dict[str, str]]]:
    """(setting, {profile: value}) of every table row of docs/REPRODUCING.md that names one setting."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "REPRODUCING.md").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6:
            continue
        setting = re.fullmatch(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)`", cells[2])
        if setting:
            values = [re.fullmatch(r"`(.*)`", cell) for cell in cells[3:]]
            assert all(values), f"row {cells[2]}: every profile value must be `quoted`"
            rows.append((setting.group(1), dict(zip(("sd14", "sd21", "tiny"), (v.group(1) for v in values)))))
    return rows


def test_paper_profiles_resolve_to_the_reproducing_table():
    from tokencompose_core.config import _load_yaml, load_config

    rows = _reproducing_rows()
    settings = {setting for setting, _ in rows}
    # The five differences and the recipe's training settings are all in the table.
    assert {"nouns.caption_choice", "models.clip_selector", "nouns.tagger", "models.sam.variant",
            "masks.mixed_precision", "masks.phrase_matching", "train.exclude_heldout", "sample.mixed_precision",
            "sample.safety_checker", "train.image_transform", "train.mask_transform", "train.resolution",
            "train.learning_rate", "train.max_steps", "nouns.image_ids", "masks.detector_size_rounding",
            "masks.detector_batching", "masks.clamp_boxes", "masks.keep_ungrounded_images",
            "score.owlv2_backend"} <= settings
    for profile in ("sd14", "sd21", "tiny"):
        config = load_config(profile)
        for setting, values in rows:
            resolved = config
            for part in setting.split("."):
                resolved = getattr(resolved, part)
            expected = _load_yaml(values[profile])
            assert resolved == pytest.approx(expected) if isinstance(expected, float) else resolved == expected, (
                f"{profile}: {setting} is {resolved!r}, docs/REPRODUCING.md says {values[profile]}")


def test_training_runs_with_the_reference_transforms_on_every_image(tmp_path):
    import json

    from helpers import make_cache, train_run

    from tokencompose_core.config import load_config

    cache = make_cache(tmp_path / "data", images=4, side=48)
    config = load_config("tiny", [
        f"storage.root={tmp_path}", "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
        "train.image_transform=resize_crop_bilinear", "train.mask_transform=training_resolution",
        "train.exclude_heldout=false",
    ])
    assert train_run(config, cache, str(tmp_path / "run")).global_step == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["token/up_8"] > 0 for r in records)
