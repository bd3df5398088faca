"""Manifests in, the reference's released format in and out, and safe image opening.

A manifest is JSONL or Parquet (any fsspec URL) of rows
``{image: path-or-URL, captions: str | list[str], id?: str}``; relative image
paths are relative to the manifest's folder and may not leave it, and
:class:`ImagePaths` says which other paths may be read (absolute paths and
URLs, the storage roots). The reference format is a
``metadata.jsonl`` of ``{file_name, text, attn_list: [[noun, mask_png | null], ...]}``
plus a folder of mask PNGs; :func:`import_reference` turns it into a mask cache
(so the authors' COCO masks train here unchanged) and :func:`export_reference`
writes a cache back out in that format.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from tokencompose_core import mask_cache, storage
from tokencompose_core.text import TokenPositions, unicode_problem

# path_problem: why the row's image may not be read (ImagePaths), None when it may.
MANIFEST_COLUMNS = ["id", "image", "captions", "path_problem"]
REFERENCE_STAGE = "reference"
NOUNS_STAGE = "nouns"
# Stage 1 output: one row per image x noun; noun is null on the single row of an
# image without a usable noun (it still trains with the denoising loss).
NOUNS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("caption", pa.string()),
        ("noun", pa.string()),
        ("token_positions", pa.list_(pa.int32())),
    ]
)
# An MMDiT profile's nouns table: token_positions are the noun's columns in the joint attention's
# text segment, and this column keeps each text encoder's own positions ("clip": start token
# at 0; "t5": none), in the segment's order.
ENCODER_POSITIONS = "encoder_positions"
MMDIT_NOUNS_SCHEMA = NOUNS_SCHEMA.append(pa.field(
    ENCODER_POSITIONS, pa.list_(pa.struct([("encoder", pa.string()), ("positions", pa.list_(pa.int32()))]))))


class ImageError(ValueError):
    """An image that cannot be used; ``str(error)`` is the rejects-table reason."""


def is_url(path: str) -> bool:
    return "://" in path


def resolve(base_dir: str, path: str) -> str:
    """``path`` as a URI: absolute paths and URLs as they are, others under ``base_dir``."""
    if is_url(path) or path.startswith("/"):
        return path
    joined = posixpath.join(base_dir, path)
    # normpath would fold the '//' of a URL scheme.
    return joined if is_url(base_dir) else posixpath.normpath(joined)


@dataclass(frozen=True)
class ImagePaths:
    """Which image paths of a manifest may be read.

    A relative path may never leave the manifest's folder (``../x.png``). Absolute paths
    and URLs are read only with ``allow_absolute``. With ``roots`` (``storage.allowed_roots``)
    every image must lie under one of them, symlinks resolved.
    """

    allow_absolute: bool = True
    roots: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, nouns: Any, allowed_roots: list[str]) -> "ImagePaths":
        """From a ``NounsConfig`` and ``storage.allowed_roots``."""
        return cls(nouns.allow_absolute_image_paths, tuple(allowed_roots))

    def problem(self, base_dir: str, path: str) -> str | None:
        """Why the image ``path`` of a manifest in ``base_dir`` may not be read; None when it may."""
        text_problem = unicode_problem(path)
        if text_problem:  # no filesystem call can take it
            return f"image path is not valid Unicode text: {text_problem}"
        if is_url(path) or path.startswith("/"):
            if not self.allow_absolute:
                return (f"image path not allowed: {path!r} is absolute; give paths relative to the manifest's "
                        "folder or set nouns.allow_absolute_image_paths=true")
        elif posixpath.normpath(path).split("/")[0] == "..":
            return f"image path not allowed: {path!r} leaves the manifest's folder {base_dir}"
        if self.roots:
            try:
                storage.check_under_roots(resolve(base_dir, path), list(self.roots))
            except (ImportError, ValueError) as error:  # ImportError: a URL whose filesystem is not installed
                return f"image path not allowed: {error}"
        return None


@contextlib.contextmanager
def _parquet_errors(uri: str) -> Iterator[None]:
    """A file that is not Parquet: a ValueError naming it (pyarrow names a buffer, not the file)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{uri} is not a readable Parquet file ({error})") from None


def _read_rows(uri: str) -> list[dict[str, Any]]:
    if uri.endswith((".parquet", ".pq")):
        with _parquet_errors(uri):
            return storage.read_parquet(uri).to_dict("records")
    data = storage.read_bytes(uri)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{uri}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}); "
                         "save the manifest as UTF-8") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{uri}: line {number} is not valid JSON ({error.msg})") from None
    return rows


def _captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise ValueError(f"'captions' must be a string or a list of strings, got {type(value).__name__}")
    return [str(caption) for caption in value if str(caption).strip()]


def read_manifest(uri: str, paths: ImagePaths | None = None) -> pd.DataFrame:
    """Rows ``id`` (str), ``image`` (URI), ``captions`` (list[str]) and ``path_problem`` (why
    ``paths``, by default any absolute path and no roots, refuse the image; None when they
    do not); ids default to the image stem."""
    base_dir = posixpath.dirname(uri)
    paths = paths or ImagePaths()
    records = []
    for number, row in enumerate(_read_rows(uri), start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{uri}: row {number} is not an object with 'image' and 'captions'")
        if not row.get("image"):
            raise ValueError(f"{uri}: row {number} has no 'image'")
        if not isinstance(row["image"], str):
            raise ValueError(f"{uri}: row {number}: 'image' must be a string, got {type(row['image']).__name__}")
        image = resolve(base_dir, row["image"])
        image_id = row.get("id")
        image_id = str(image_id) if image_id not in (None, "") else posixpath.splitext(posixpath.basename(image))[0]
        try:
            captions = _captions(row.get("captions"))
        except ValueError as error:
            raise ValueError(f"{uri}: row {number}: {error}") from None
        records.append({"id": image_id, "image": image, "captions": captions,
                        "path_problem": paths.problem(base_dir, row["image"])})
    # object dtype: pandas' Arrow-backed strings refuse a lone surrogate, which stage 1 rejects row by row.
    frame = pd.DataFrame(records, columns=MANIFEST_COLUMNS, dtype=object)
    duplicated = frame["id"][frame["id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{uri}: duplicate image ids {duplicated[:5]}; give each row a unique 'id'")
    return frame


def _read_image_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise ImageError(f"unreadable image: file not found ({uri})") from error
    except IsADirectoryError as error:
        raise ImageError(f"unreadable image: {uri} is a folder, not an image file") from error
    except ImportError as error:  # fsspec knows the protocol, its package is not installed (http: aiohttp)
        raise ImageError(f"unreadable image: {uri}: the filesystem package for this URL is not installed "
                         f"({error})") from error
    except (OSError, ValueError) as error:  # permissions, network; ValueError: a protocol fsspec does not know
        raise ImageError(f"unreadable image: {uri}: {type(error).__name__}: {error}") from error


@dataclass
class DecodedImage:
    """An image decoded no larger than a stage needs, with what its file holds."""

    image: Image.Image  # RGB
    original_size: tuple[int, int]  # (width, height) in the file's header
    decoded_pixels: int  # the largest raster decoded on the way: the full size unless the format decodes reduced


def decode_image(uri: str, max_pixels: int, long_side: int | None = None) -> DecodedImage:
    """The RGB image at ``uri``, its long side reduced to ``long_side`` when larger.

    :class:`ImageError` (with the reason) when it cannot be used. The header's
    size is checked against ``max_pixels`` before any pixel is decoded. A JPEG is
    decoded reduced (DCT scaling: 1/2, 1/4 or 1/8 of each side, never below the
    target); other formats are decoded whole, one image at a time, then reduced,
    so the caller holds only the reduced image.
    """
    buffer = io.BytesIO(_read_image_bytes(uri))
    try:
        image = Image.open(buffer)
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        # PIL names the buffer ("<_io.BytesIO object at 0x...>"); the reader needs the image's URI.
        message = str(error).replace(repr(buffer), repr(uri))
        raise ImageError(f"unreadable image: {type(error).__name__}: {message}") from error
    original = image.size
    if original[0] * original[1] > max_pixels:
        raise ImageError(f"image too large: {original[0]}x{original[1]} > {max_pixels} pixels")
    target = original
    if long_side and max(original) > long_side:
        scale = long_side / max(original)
        target = (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
        image.draft("RGB", target)  # JPEG only; a no-op for other formats
    decoded_pixels = image.size[0] * image.size[1]
    try:
        with image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt pixel data
        raise ImageError(f"unreadable image: {type(error).__name__}: {error}") from error
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return DecodedImage(rgb, original, decoded_pixels)


def open_image(uri: str, max_pixels: int) -> Image.Image:
    """The RGB image at ``uri``, full size; :class:`ImageError` (with the reason) when it cannot be used."""
    return decode_image(uri, max_pixels).image


def image_size(uri: str) -> tuple[int, int]:
    """(height, width) from the image header, without decoding pixels."""
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
        return image.height, image.width


def _read_mask_png(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
        return np.asarray(image.convert("L")) > 0


def _reference_image(
    row: dict[str, Any], base_dir: str, image_root: str, noun_positions: Callable[[str, str], TokenPositions],
    fingerprint: str, paths: ImagePaths,
) -> tuple[list[dict], list[dict]]:
    """Shard rows and rejects of one ``metadata.jsonl`` row."""
    image_uri = resolve(image_root, row["file_name"])
    image_id = posixpath.splitext(posixpath.basename(row["file_name"]))[0]
    refused = paths.problem(image_root, row["file_name"])
    if refused:
        return [], [mask_cache.reject_row(image_id, image_uri, REFERENCE_STAGE, refused)]
    caption = row["text"]
    grounded, rejects, size = [], [], None
    for noun, mask_path in row.get("attn_list", []):
        if mask_path is None:
            rejects.append(mask_cache.reject_row(image_id, image_uri, REFERENCE_STAGE, "noun without detection", noun))
            continue
        refused = paths.problem(base_dir, mask_path)
        if refused:
            rejects.append(mask_cache.reject_row(image_id, image_uri, REFERENCE_STAGE, f"mask {refused}", noun))
            continue
        positions = noun_positions(caption, noun)
        if not positions:
            rejects.append(mask_cache.reject_row(
                image_id, image_uri, REFERENCE_STAGE, f"token-span failure: {positions.reason}", noun))
            continue
        mask = _read_mask_png(resolve(base_dir, mask_path))
        size = mask.shape
        grounded.append((noun, positions, mask))
    if size is None:
        try:
            size = image_size(image_uri)
        except (OSError, SyntaxError, ValueError) as error:
            reason = f"unreadable image: {type(error).__name__}: {error}"
            return [], rejects + [mask_cache.reject_row(image_id, image_uri, REFERENCE_STAGE, reason)]
    height, width = size
    rows = [
        mask_cache.shard_row(image_id, image_uri, caption, height, width, fingerprint, noun, positions, mask,
                             score=float("nan"))
        for noun, positions, mask in grounded
    ] or [mask_cache.shard_row(image_id, image_uri, caption, height, width, fingerprint)]
    return rows, rejects


def _stage1_manifest_error(uri: str) -> ValueError:
    return ValueError(
        f"{uri} is a stage-1 manifest (rows of 'image' and 'captions'), not a stage-2 input; run "
        f"`tokencompose nouns --input {uri}` on it first, or pass the nouns table (nouns.parquet) or the "
        "reference's metadata.jsonl to `tokencompose masks --input`"
    )


def read_reference_metadata(uri: str) -> list[dict[str, Any]]:
    """The rows of the reference's ``metadata.jsonl``; a ``ValueError`` naming the file and the
    row when it is not in that format (a stage-1 manifest given to stage 2 is told so)."""
    rows = _read_rows(uri)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{uri}: row {number} is not an object with 'file_name', 'text' and 'attn_list'")
        if "file_name" not in row and "image" in row:
            raise _stage1_manifest_error(uri)
        missing = [key for key in ("file_name", "text") if not isinstance(row.get(key), str)]
        if missing or not isinstance(row.get("attn_list", []), list):
            raise ValueError(f"{uri}: row {number} is not a reference metadata row: needs 'file_name' and 'text' "
                             f"strings and an 'attn_list' list, has keys {sorted(row)[:8]}")
    return rows


def masks_input_kind(uri: str) -> str:
    """What stage 2 was given: ``"nouns"`` (stage 1's nouns table, Parquet) or ``"reference"``
    (the authors' ``metadata.jsonl``). A ``ValueError`` says what was expected otherwise,
    e.g. for a stage-1 manifest."""
    if uri.endswith(".jsonl"):
        read_reference_metadata(uri)
        return "reference"
    if not uri.endswith((".parquet", ".pq")):
        raise ValueError(f"{uri}: stage 2 takes the nouns table (nouns.parquet) or the reference's metadata.jsonl")
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with _parquet_errors(uri), fs.open(path, "rb") as handle:
        columns = set(pq.read_schema(handle).names)
    missing = [name for name in NOUNS_SCHEMA.names if name not in columns]
    if missing and "image" in columns:
        raise _stage1_manifest_error(uri)
    if missing:
        raise ValueError(f"{uri} is not a nouns table: columns {missing} are missing")
    return "nouns"


def import_reference(
    metadata_uri: str,
    cache_uri: str,
    noun_positions: Callable[[str, str], TokenPositions],
    image_root: str | None = None,
    shard_size: int = 256,
    fingerprint: str = "reference-import",
    paths: ImagePaths | None = None,
) -> dict[str, Any]:
    """Write a mask cache from the reference's ``metadata.jsonl`` + mask PNGs.

    Mask paths are relative to the metadata file's folder, image file names to
    ``image_root`` (default: that folder too); ``paths`` decides which of them may be
    read, as for a manifest (an image or mask it refuses is a rejects row naming it).
    Nouns with a null mask go to the rejects as "noun without detection"; the score
    column is NaN (none released). ``noun_positions(caption, noun)``: the noun's token
    positions for the profile's model (``stages.nouns.noun_positions``).
    """
    base_dir = posixpath.dirname(metadata_uri)
    paths = paths or ImagePaths()
    rows = read_reference_metadata(metadata_uri)
    shards = []
    for start in range(0, len(rows), shard_size):
        shard_rows, shard_rejects = [], []
        for row in rows[start : start + shard_size]:
            grounded, rejects = _reference_image(row, base_dir, image_root or base_dir, noun_positions, fingerprint,
                                                 paths)
            shard_rows += grounded
            shard_rejects += rejects
        name = f"shard-{start // shard_size:05d}"
        shard_frame, reject_frame = mask_cache.rows_frame(shard_rows), mask_cache.rejects_frame(shard_rejects)
        mask_cache.commit_shard(cache_uri, name, shard_frame, reject_frame)
        shards.append(name)
    return {"cache_uri": cache_uri, "shards": shards, "images": len(rows)}


def _safe_name(noun: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", noun).strip("_") or "noun"


def _png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def export_reference(cache_uri: str, out_uri: str, image_root: str | None = None) -> str:
    """Write ``metadata.jsonl`` + ``seg/<id>/mask_<id>_<noun>.png`` from a mask cache.

    File names are relative to ``image_root`` when the image lies under it, else
    the image URI. Nouns rejected as "noun without detection" come back with a
    null mask, as in the reference. Returns the metadata URI.
    """
    cache = mask_cache.MaskCache(cache_uri)
    rejects = cache.rejects()
    undetected = rejects[rejects["reason"] == "noun without detection"].groupby("image_id")["noun"].apply(list)
    lines = []
    for image_id in cache.image_ids():
        image = cache.get(image_id)
        attn_list = []
        for noun, mask in zip(image.nouns, image.masks):
            relative = f"seg/{image_id}/mask_{image_id}_{_safe_name(noun)}.png"
            storage.atomic_write_bytes(storage.join(out_uri, relative), _png_bytes(mask))
            attn_list.append([noun, relative])
        attn_list += [[noun, None] for noun in undetected.get(image_id, [])]
        file_name = image.image_uri
        if image_root and file_name.startswith(image_root.rstrip("/") + "/"):
            file_name = file_name[len(image_root.rstrip("/")) + 1 :]
        lines.append(json.dumps({"file_name": file_name, "text": image.caption, "attn_list": attn_list}))
    metadata_uri = storage.join(out_uri, "metadata.jsonl")
    storage.atomic_write_bytes(metadata_uri, ("\n".join(lines) + "\n").encode("utf-8"))
    return metadata_uri
