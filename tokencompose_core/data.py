"""Training data from the stage-2 mask cache: images, captions, nouns and masks.

Two ways to bring an image and its masks to the training resolution R
(``train.image_transform`` and ``train.mask_transform``):

* the reference's (``resize_crop_bilinear`` / ``training_resolution``): the
  short side is resized to R with PIL bilinear, then the centre R x R is cut
  out; masks take the same path as 0/255 grey images (:func:`training_mask`),
  and the loss resizes that R x R mask to each layer (bilinear, then > 0);
* ours (``crop_resize_bicubic`` / ``latent_grid``): the centre square is cut
  out and resized bicubic; masks go from the source straight to the latent grid
  (bilinear, then > 0, as docs/METHOD.md section 2): one resampling less, and a batch carries small masks
  only. The two give different binary masks at the coarse layers wherever a
  mask has thin parts.

Either way the resizing runs in the data-loader workers, not in the step. Each
example also records SDXL's size conditioning (``time_ids``: original size, the
crop's top-left in the image scaled to short side R, and R x R), which SD 1.x/2.x
ignore.

Batches are drawn by :class:`ResumableBatchSampler`: an endless sequence of
seeded per-epoch permutations, split between processes, that can start at any
micro-batch, so resuming a run continues the exact data order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tokencompose_core import storage
from tokencompose_core.conditioning import time_ids
from tokencompose_core.mask_cache import MaskCache, heldout_image_ids, resize_masks


def load_image(uri: str) -> Image.Image:
    """An RGB image from any fsspec URI."""
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
        return image.convert("RGB")


IMAGE_TRANSFORMS = ("resize_crop_bilinear", "crop_resize_bicubic")
MASK_TRANSFORMS = ("training_resolution", "latent_grid")


def _center_square(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the central square crop."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def _short_side_crop(width: int, height: int, side: int) -> tuple[tuple[int, int], int, int]:
    """((w, h) after the short side goes to ``side``, top, left of the centre ``side`` square)."""
    if width <= height:
        size = (side, int(side * height / width))
    else:
        size = (int(side * width / height), side)
    return size, int(round((size[1] - side) / 2.0)), int(round((size[0] - side) / 2.0))


def _resize_short_side_and_crop(image: Image.Image, side: int) -> Image.Image:
    """Short side to ``side`` (PIL bilinear, long side truncated), then the centre ``side`` square.

    Sizes and offsets follow torchvision's ``Resize(side)`` and ``CenterCrop(side)``,
    the reference's transforms, to the pixel.
    """
    size, top, left = _short_side_crop(image.width, image.height, side)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    return image.crop((left, top, left + side, top + side))


def _training_mask_pixels(mask: np.ndarray, resolution: int) -> np.ndarray:
    """(H0, W0) mask -> (R, R) uint8 0..255: the reference's mask image, resized and cropped.

    The reference stores each mask as a black/white image; this is its first
    channel after the transform, before scaling to [0, 1].
    """
    image = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(_resize_short_side_and_crop(image, resolution))


def training_mask(mask: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """The (R, R) float mask the reference trains with, from a (H0, W0) bool/uint8 mask.

    Short side to R (PIL bilinear), centre crop, scaled to [0, 1] and divided by
    its maximum. :func:`tokencompose_core.losses.grounding_losses` then resizes it
    to each layer (bilinear, no antialias) and keeps every pixel > 0.
    """
    pixels = torch.from_numpy(_training_mask_pixels(np.asarray(mask), resolution).astype(np.float32)) / 255
    peak = pixels.max()
    return pixels / peak if peak > 0 else pixels


def training_image_ids(cache: MaskCache, heldout: int) -> list[str]:
    """The cache's images minus the ``heldout`` ones kept for attention-map scoring."""
    excluded = set(heldout_image_ids(cache.image_ids(), heldout)) if heldout else set()
    ids = [image_id for image_id in cache.image_ids() if image_id not in excluded]
    if not ids:
        raise ValueError(f"no training images in {cache.uri} after holding out {heldout}")
    return ids


class GroundingDataset(torch.utils.data.Dataset):
    """Examples ``{pixels (3, R, R) uint8, caption, masks (N, m, m) uint8, token_positions}``.

    ``image_transform`` and ``mask_transform`` are one of :data:`IMAGE_TRANSFORMS`
    and :data:`MASK_TRANSFORMS` (module docstring). With ``training_resolution``
    the masks are (N, R, R) 0..255: :func:`training_mask` before its scaling,
    which changes no pixel's sign, so the losses see the same binary masks.
    ``mask_size`` (``latent_grid`` only) is the latent side (resolution / VAE
    factor). With ``in_memory`` every example is decoded once and kept: worth it
    for small images (the synthetic demo), where decoding would dominate the step.
    """

    def __init__(
        self,
        cache: MaskCache,
        image_ids: list[str],
        resolution: int,
        mask_size: int,
        in_memory: bool = False,
        image_transform: str = "crop_resize_bicubic",
        mask_transform: str = "latent_grid",
    ) -> None:
        if image_transform not in IMAGE_TRANSFORMS or mask_transform not in MASK_TRANSFORMS:
            raise ValueError(f"unknown transforms {image_transform!r}, {mask_transform!r}; "
                             f"use one of {IMAGE_TRANSFORMS} and one of {MASK_TRANSFORMS}")
        self.cache = cache
        self.image_ids = list(image_ids)
        self.resolution = resolution
        self.mask_size = mask_size
        self.image_transform = image_transform
        self.mask_transform = mask_transform
        self._memory: dict[int, dict] | None = {} if in_memory else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        if self._memory is not None and index in self._memory:
            return self._memory[index]
        example = self._load(self.image_ids[index])
        if self._memory is not None:
            self._memory[index] = example
        return example

    def _image(self, image: Image.Image) -> Image.Image:
        if self.image_transform == "resize_crop_bilinear":
            return _resize_short_side_and_crop(image, self.resolution)
        top, left, side = _center_square(image.height, image.width)
        image = image.crop((left, top, left + side, top + side))
        if image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution, self.resolution), Image.BICUBIC)
        return image

    def _masks(self, masks: np.ndarray) -> np.ndarray:
        """(N, H0, W0) masks at the image's recorded size -> (N, m, m) uint8."""
        if self.mask_transform == "training_resolution":
            resized = [_training_mask_pixels(mask, self.resolution) for mask in masks]
            return np.stack(resized) if resized else np.zeros((0, self.resolution, self.resolution), np.uint8)
        top, left, side = _center_square(masks.shape[1], masks.shape[2])
        return resize_masks(masks[:, top : top + side, left : left + side], (self.mask_size, self.mask_size))

    def _time_ids(self, width: int, height: int) -> list[int]:
        """SDXL's (original h, w, crop top, left, R, R); both transforms cut the centre square,
        so the crop is where it lands in the image scaled to short side R."""
        _, top, left = _short_side_crop(width, height, self.resolution)
        return time_ids((height, width), (top, left), (self.resolution, self.resolution))

    def _load(self, image_id: str) -> dict:
        grounded = self.cache.get(image_id)
        source = load_image(grounded.image_uri)
        image = self._image(source)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {
            "pixels": pixels,
            "caption": grounded.caption,
            "masks": torch.from_numpy(self._masks(grounded.masks)),
            "token_positions": grounded.token_positions,
            "time_ids": self._time_ids(source.width, source.height),
        }


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, R, R) float in [-1, 1]
    captions: list[str]
    masks: torch.Tensor  # (B, N, m, m) uint8, zero-padded nouns
    token_positions: torch.Tensor  # (B, N, K) long, -1 padded
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL size conditioning, when the examples carry it


def collate(examples: list[dict]) -> Batch:
    """Stack images; pad nouns and token positions so each sample keeps its own."""
    nouns = max(1, max(len(e["token_positions"]) for e in examples))
    width = max(1, max((len(p) for e in examples for p in e["token_positions"]), default=1))
    mask_size = examples[0]["masks"].shape[-2:]
    masks = torch.zeros(len(examples), nouns, *mask_size, dtype=torch.uint8)
    positions = torch.full((len(examples), nouns, width), -1, dtype=torch.long)
    for b, example in enumerate(examples):
        count = len(example["token_positions"])
        if count:
            masks[b, :count] = example["masks"]
        for i, tokens in enumerate(example["token_positions"]):
            positions[b, i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    pixels = torch.stack([e["pixels"] for e in examples]).float().div_(127.5).sub_(1.0)
    ids = torch.tensor([e["time_ids"] for e in examples], dtype=torch.float32) \
        if all("time_ids" in e for e in examples) else None
    return Batch(pixels, [e["caption"] for e in examples], masks, positions, ids)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless batches of indices: epoch ``e`` is a permutation seeded by ``seed + e``.

    Each of ``world_size`` processes takes every ``world_size``-th index of the
    permutation (all get the same count), cut into full batches; ``start`` skips
    that many of this process's batches, which is how a resumed run continues.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.batches_per_epoch = (num_samples // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} training images cannot fill one batch of {batch_size} on {world_size} process(es)"
            )

    def _epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator)[self.rank :: self.world_size]
        order = order[: self.batches_per_epoch * self.batch_size].view(-1, self.batch_size)
        return order.tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        while True:
            yield from self._epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0
