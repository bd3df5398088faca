"""COCO run-length encoding of binary masks (pycocotools-compatible compressed counts).

The mask cache stores each mask as the ``counts`` string of a COCO compressed RLE,
so any COCO tool reads it back with ``{"size": [height, width], "counts": counts}``.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode(mask: np.ndarray) -> str:
    """HxW boolean (or {0,1}) mask -> COCO compressed RLE counts string."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    # pycocotools reads column-major uint8 (its RLE runs down the columns).
    fortran = np.asfortranarray(mask.astype(bool, copy=False).astype(np.uint8))
    return coco_mask.encode(fortran)["counts"].decode("ascii")


def decode(counts: str, height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts -> HxW bool mask."""
    rle = {"size": [int(height), int(width)], "counts": counts.encode("ascii")}
    return coco_mask.decode(rle).astype(bool)
