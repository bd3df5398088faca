"""The mask cache: Parquet shards of grounded nouns, a completed-shard manifest, rejects.

Layout under a cache URI (any fsspec URL)::

    shards/<name>.parquet      one row per (image, grounded noun); SHARD_SCHEMA
    rejects/<name>.parquet     rows that could not be used, with a reason; REJECT_SCHEMA
    _completed/<name>.json     one marker per committed shard (written last, atomically)
    _completed.json            all markers merged: {name: {rows, fingerprint, inputs, ...}}

A shard counts as done only once its marker exists, and the marker is written
after both Parquet files were published atomically, so a killed run never
leaves a half shard that looks complete. Markers have one writer each, so
shards committed concurrently (threads, Dask workers) cannot lose each other's
record; ``_completed.json`` is the merged view, rewritten after every commit.

:class:`MaskCache` is the reader training and scoring use: random access by
image id, masks decoded from RLE and optionally resized.
"""

from __future__ import annotations

import io
import posixpath
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tokencompose_core import rle, storage
from tokencompose_core.identity import stable_order_key

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("caption", pa.string()),
        ("noun", pa.string()),  # null on the single row of an image with no grounded noun
        ("token_positions", pa.list_(pa.int32())),
        ("mask_counts", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("box", pa.list_(pa.float32())),
        ("score", pa.float32()),
        ("fingerprint", pa.string()),
    ]
)
REJECT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("noun", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)
COMPLETED = "_completed.json"
_MARKERS = "_completed"


def to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """``frame`` as a table of exactly ``schema`` (column order and types); errors name missing columns."""
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise ValueError(f"missing columns {missing}; expected {schema.names}")
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def empty_rejects() -> pd.DataFrame:
    return REJECT_SCHEMA.empty_table().to_pandas()


def write_table(table: pa.Table, uri: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.atomic_write_bytes(uri, buffer.getvalue())


def _read_arrow(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def _read_table(uri: str, columns: list[str] | None = None) -> pd.DataFrame:
    return _read_arrow(uri, columns).to_pandas()


def _check_name(shard_name: str) -> str:
    if not shard_name or "/" in shard_name or shard_name.startswith(("_", ".")):
        raise ValueError(f"invalid shard name {shard_name!r}")
    return shard_name


def commit_shard(
    cache_uri: str,
    shard_name: str,
    rows: pd.DataFrame,
    rejects: pd.DataFrame | None = None,
    inputs: str | None = None,
    fingerprint: str | None = None,
) -> str:
    """Publish one shard (rows + rejects) atomically and record it as completed.

    ``inputs`` is an optional digest of what the shard was computed from, and
    ``fingerprint`` the settings it was computed with (default: the rows'), so a
    re-run can tell a completed shard of the same inputs and settings from a stale
    one, also when every image of it was rejected and it has no row to say so.
    Returns the shard's URI.
    """
    _check_name(shard_name)
    table = to_table(rows, SHARD_SCHEMA)
    fingerprints = sorted(set(table.column("fingerprint").to_pylist()) - {None} | ({fingerprint} - {None}))
    if len(fingerprints) > 1:
        raise ValueError(f"shard {shard_name} mixes fingerprints {fingerprints}")
    reject_table = to_table(rejects if rejects is not None else empty_rejects(), REJECT_SCHEMA)
    shard_uri = storage.join(cache_uri, "shards", f"{shard_name}.parquet")
    write_table(reject_table, storage.join(cache_uri, "rejects", f"{shard_name}.parquet"))
    write_table(table, shard_uri)
    record = {
        "rows": table.num_rows,
        "images": len(set(table.column("image_id").to_pylist())),
        "rejects": reject_table.num_rows,
        "fingerprint": fingerprints[0] if fingerprints else None,
        "inputs": inputs,
        "bytes": _size(shard_uri),
    }
    storage.atomic_write_json(storage.join(cache_uri, _MARKERS, f"{shard_name}.json"), record)
    storage.atomic_write_json(storage.join(cache_uri, COMPLETED), _merged_markers(cache_uri))
    return shard_uri


def _merged_markers(cache_uri: str) -> dict[str, dict]:
    fs, path = storage.filesystem(storage.join(cache_uri, _MARKERS))
    if not fs.exists(path):
        return {}
    merged = {}
    for marker in sorted(fs.ls(path, detail=False)):
        name = posixpath.basename(marker)
        if name.endswith(".json"):
            merged[name[: -len(".json")]] = storage.read_json(storage.join(cache_uri, _MARKERS, name))
    return merged


def completed_shards(cache_uri: str) -> dict[str, dict]:
    """Committed shards: name -> {rows, images, rejects, fingerprint, inputs}."""
    completed_uri = storage.join(cache_uri, COMPLETED)
    listed = storage.read_json(completed_uri) if storage.exists(completed_uri) else {}
    # A commit whose manifest rewrite raced another's is still in the markers.
    return {**listed, **_merged_markers(cache_uri)}


def _size(uri: str) -> int | None:
    fs, path = storage.filesystem(uri)
    return fs.info(path)["size"] if fs.exists(path) else None


def shard_is_whole(cache_uri: str, shard_name: str, record: dict[str, Any]) -> bool:
    """The committed shard file is there with the size its marker recorded (a truncated or
    deleted shard is not trusted; markers from before sizes were recorded check existence)."""
    size = _size(storage.join(cache_uri, "shards", f"{shard_name}.parquet"))
    return size is not None and record.get("bytes", size) == size


def heldout_image_ids(image_ids: list[str], count: int) -> list[str]:
    """The cache images stage 5 measures attention mIoU on (and training leaves out): the
    ``count`` ids with the smallest SHA-1, so the subset does not depend on cache order and
    grows by inclusion as ``count`` grows."""
    return sorted(image_ids, key=stable_order_key)[:count]


def require_committed(cache_uri: str) -> str:
    """``cache_uri``, if it has committed shards; else an error naming the command to run."""
    if not completed_shards(cache_uri):
        raise FileNotFoundError(f"no committed mask-cache shards in {cache_uri}: run `tokencompose masks` first")
    return cache_uri


def remove_shard(cache_uri: str, shard_name: str) -> None:
    """Withdraw a shard (e.g. left over from a larger earlier input): marker first, then files."""
    _check_name(shard_name)
    for parts in ((_MARKERS, f"{shard_name}.json"), ("shards", f"{shard_name}.parquet"),
                  ("rejects", f"{shard_name}.parquet")):
        fs, path = storage.filesystem(storage.join(cache_uri, *parts))
        if fs.exists(path):
            fs.rm(path)
    storage.atomic_write_json(storage.join(cache_uri, COMPLETED), _merged_markers(cache_uri))


@dataclass
class GroundedImage:
    """One training image's grounding: nouns, their token positions and masks."""

    image_id: str
    image_uri: str
    caption: str
    height: int
    width: int
    nouns: list[str]
    token_positions: list[list[int]]
    masks: np.ndarray  # (N, h, w) uint8 {0, 1}
    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) {0,1} -> (N, h, w) uint8: bilinear, align_corners=False, no antialias, then > 0 (docs/METHOD.md, section 2)."""
    import torch
    import torch.nn.functional as F

    if masks.shape[0] == 0:
        return np.zeros((0, *size), dtype=np.uint8)
    tensor = torch.from_numpy(masks.astype(np.float32))[:, None]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=False)
    return (resized[:, 0] > 0).numpy().astype(np.uint8)


class MaskCache:
    """Random-access reader of a mask cache: ``get(image_id, size)`` -> :class:`GroundedImage`.

    The image index (image id -> shard and rows) is built once from the committed
    shards; decoded shard tables are kept in a small LRU so that reading images
    of one shard in a row costs one Parquet read.
    """

    def __init__(self, uri: str, max_cached_shards: int = 8) -> None:
        self.uri = uri
        self.shards = completed_shards(uri)
        self._max_cached = max_cached_shards
        # Decoded shards as plain rows grouped by image: no DataFrame indexing per get().
        self._tables: OrderedDict[str, dict[str, list[dict[str, Any]]]] = OrderedDict()
        self._index: dict[str, str] = {}  # image id -> shard name
        for name in sorted(self.shards):
            for image_id in _read_arrow(self._shard_uri(name), columns=["image_id"]).column("image_id").to_pylist():
                self._index[image_id] = name
        self._ids = sorted(self._index)

    def _shard_uri(self, name: str) -> str:
        return storage.join(self.uri, "shards", f"{name}.parquet")

    def _table(self, name: str) -> dict[str, list[dict[str, Any]]]:
        if name in self._tables:
            self._tables.move_to_end(name)
        else:
            grouped: dict[str, list[dict[str, Any]]] = {}
            for row in _read_arrow(self._shard_uri(name)).to_pylist():
                grouped.setdefault(row["image_id"], []).append(row)
            self._tables[name] = grouped
            if len(self._tables) > self._max_cached:
                self._tables.popitem(last=False)
        return self._tables[name]

    def image_ids(self) -> list[str]:
        """Every image of the committed shards, sorted."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def get(self, image_id: str, size: tuple[int, int] | None = None) -> GroundedImage:
        """The image's grounding; masks at ``size`` (h, w) when given, else the image's size."""
        if image_id not in self._index:
            raise KeyError(f"image {image_id!r} is not in the mask cache {self.uri}")
        rows = self._table(self._index[image_id])[image_id]
        height, width = rows[0]["height"], rows[0]["width"]
        grounded = [row for row in rows if row["noun"] is not None]
        if grounded:
            masks = np.stack([rle.decode(row["mask_counts"], height, width) for row in grounded])
        else:
            masks = np.zeros((0, height, width), dtype=bool)
        masks = masks.astype(np.uint8) if size is None else resize_masks(masks, tuple(size))
        return GroundedImage(
            image_id=image_id,
            image_uri=rows[0]["image_uri"],
            caption=rows[0]["caption"],
            height=height,
            width=width,
            nouns=[row["noun"] for row in grounded],
            token_positions=[row["token_positions"] for row in grounded],
            masks=masks,
            boxes=[row["box"] for row in grounded],
            scores=[row["score"] for row in grounded],
        )

    def rejects(self) -> pd.DataFrame:
        """Rejected rows of every committed shard, with their reasons."""
        frames = [_read_table(storage.join(self.uri, "rejects", f"{name}.parquet")) for name in sorted(self.shards)]
        return pd.concat(frames, ignore_index=True) if frames else empty_rejects()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the index but not the parent's decoded tables.
        return {**self.__dict__, "_tables": OrderedDict()}


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight x0, y0, x1, y1 pixel box of a non-empty mask (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def shard_row(
    image_id: str,
    image_uri: str,
    caption: str,
    height: int,
    width: int,
    fingerprint: str,
    noun: str | None = None,
    token_positions: list[int] | None = None,
    mask: np.ndarray | None = None,
    box: list[float] | None = None,
    score: float | None = None,
) -> dict[str, Any]:
    """One shard row; without ``noun`` it is the single row of an image with no grounded noun."""
    return {
        "image_id": image_id,
        "image_uri": image_uri,
        "caption": caption,
        "noun": noun,
        "token_positions": list(token_positions or []),
        "mask_counts": rle.encode(mask) if mask is not None else None,
        "height": int(height),
        "width": int(width),
        "box": box if box is not None else (mask_box(mask) if mask is not None else None),
        "score": score,
        "fingerprint": fingerprint,
    }


def _writable(text: str | None) -> str | None:
    # A rejected row may be rejected for holding a lone surrogate, which Parquet cannot store: keep it escaped.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def reject_row(image_id: str, image_uri: str, stage: str, reason: str, noun: str | None = None) -> dict[str, Any]:
    return {"image_id": _writable(image_id), "image_uri": _writable(image_uri), "noun": _writable(noun),
            "stage": stage, "reason": _writable(reason)}


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=SHARD_SCHEMA.names)


def rejects_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=REJECT_SCHEMA.names)
