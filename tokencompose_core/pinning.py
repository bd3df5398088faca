"""Regenerating the paper's data pinned to the authors' images: stage 1's image allowlist.

``nouns.image_ids`` names the images stage 1 keeps: a list of ids, the name of a
list shipped with the package, or a file of ids (any fsspec URI), one per line,
``#`` starting a comment. A manifest row is kept when its id or its image's file
name is listed; every other row becomes a rejects row saying so. Names compare
as file stems without an image extension, all-digit ones as numbers, so COCO's
``000000000142.jpg``, ``000000000142`` and its integer id ``142`` are one image.

Shipped lists (``resources/image_ids/<name>.txt``):

* ``tokencompose-4526``: the 4,526 COCO train2017 images of the TokenCompose
  authors' released training data, the images the paper fine-tunes on.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tokencompose_core.identity import value_hash

if TYPE_CHECKING:
    import pandas as pd

SHIPPED_DIR = Path(__file__).resolve().parent / "resources" / "image_ids"
_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_STAGE = "nouns"  # the rejects' stage: stage 1 applies the allowlist

ImageIds = str | Sequence[str | int] | None


def shipped_lists() -> list[str]:
    """Names of the id lists shipped with the package."""
    return sorted(path.stem for path in SHIPPED_DIR.glob("*.txt"))


def image_key(name: str | int) -> str:
    """The name an image is matched by: the file stem when ``name`` is a path with an image
    extension, all-digit stems as numbers without leading zeros."""
    base = posixpath.basename(str(name).strip())
    stem, extension = posixpath.splitext(base)
    if extension.lower() in _IMAGE_EXTENSIONS:
        base = stem
    return str(int(base)) if base.isdecimal() else base  # isdigit() would pass "²", which int() refuses


def _parse(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_id_list(spec: str) -> list[str]:
    """The ids of a shipped list (by name) or of a file (by URI)."""
    shipped = SHIPPED_DIR / f"{spec}.txt"
    if "/" not in spec and shipped.is_file():
        return _parse(shipped.read_text(encoding="utf-8"))
    from tokencompose_core import storage  # here: stage keys are computed without fsspec and pandas

    if not storage.exists(spec):
        raise ValueError(f"nouns.image_ids: {spec!r} is neither a shipped list ({', '.join(shipped_lists())}) "
                         "nor a file of image ids")
    return _parse(storage.read_bytes(spec).decode("utf-8"))


def allowed_keys(spec: ImageIds) -> frozenset[str] | None:
    """The :func:`image_key` of every listed image; None when every image is allowed."""
    if spec is None:
        return None
    names = read_id_list(spec) if isinstance(spec, str) else list(spec)
    return frozenset(image_key(name) for name in names)


def allowlist_identity(spec: ImageIds) -> str | None:
    """What the allowlist means, by content: a shipped list or file counts by its ids, so
    editing it changes stage 1's key, and the same ids count the same however given."""
    keys = allowed_keys(spec)
    return None if keys is None else value_hash(sorted(keys))


def _describe(spec: str | Sequence[str | int]) -> str:
    return spec if isinstance(spec, str) else f"a list of {len(spec)} ids"


def restrict_manifest(manifest: pd.DataFrame, spec: ImageIds) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The manifest rows of allowed images, and a rejects row for each other one.

    Applied before any caption is chosen, so rows left out cost no image read.
    """
    from tokencompose_core import mask_cache

    keys = allowed_keys(spec)
    if keys is None:
        return manifest, []
    inside = [image_key(image_id) in keys or image_key(image) in keys
              for image_id, image in zip(manifest["id"], manifest["image"])]
    reason = f"image not in the allowlist nouns.image_ids ({_describe(spec)})"
    rejects = [mask_cache.reject_row(row.id, row.image, _STAGE, reason)
               for row, kept in zip(manifest.itertuples(index=False), inside) if not kept]
    return manifest[inside].reset_index(drop=True), rejects
