"""RLE exactness and the mask cache: atomic shards, completed manifest, reader."""

from __future__ import annotations

from pathlib import Path

import threading

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask

from tokencompose_core import mask_cache, rle


def _disk(height: int, width: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (480, 640)])
def test_rle_round_trip_is_exact(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for mask in (rng.random(shape) > 0.5, np.zeros(shape, bool), np.ones(shape, bool)):
        assert np.array_equal(rle.decode(rle.encode(mask), *shape), mask)


def test_rle_is_pycocotools_compatible() -> None:
    mask = _disk(50, 70, 20, 30, 12)
    counts = rle.encode(mask)
    rle_dict = {"size": [50, 70], "counts": counts.encode()}
    assert coco_mask.area(rle_dict) == mask.sum()
    assert np.array_equal(coco_mask.decode(rle_dict).astype(bool), mask)
    assert list(coco_mask.toBbox(rle_dict)) == [18.0, 8.0, 25.0, 25.0]  # x, y, w, h of the disk


def _image_rows(image_id: str, masks: dict[str, np.ndarray], fingerprint: str = "fp") -> list[dict]:
    height, width = next(iter(masks.values())).shape if masks else (20, 30)
    if not masks:
        return [mask_cache.shard_row(image_id, f"{image_id}.png", "a scene", height, width, fingerprint)]
    return [
        mask_cache.shard_row(image_id, f"{image_id}.png", f"a {' and a '.join(masks)}", height, width, fingerprint,
                             noun, [2 + 3 * i], mask, score=0.5)
        for i, (noun, mask) in enumerate(masks.items())
    ]


def test_commit_and_read_back(tmp_path) -> None:
    cache = str(tmp_path / "cache")
    dog, cat = _disk(40, 60, 10, 10, 6), _disk(40, 60, 25, 40, 9)
    rows = mask_cache.rows_frame(_image_rows("b", {"dog": dog, "cat": cat}) + _image_rows("a", {}))
    rejects = mask_cache.rejects_frame([mask_cache.reject_row("c", "c.png", "masks", "unreadable image: x")])
    uri = mask_cache.commit_shard(cache, "shard-00000", rows, rejects, inputs="abc")
    assert uri.endswith("shards/shard-00000.parquet")
    record = mask_cache.completed_shards(cache)["shard-00000"]
    shard_bytes = (Path(cache) / "shards" / "shard-00000.parquet").stat().st_size
    assert record == {"rows": 3, "images": 2, "rejects": 1, "fingerprint": "fp", "inputs": "abc", "bytes": shard_bytes}

    reader = mask_cache.MaskCache(cache)
    assert reader.image_ids() == ["a", "b"] and len(reader) == 2
    image = reader.get("b")
    assert image.nouns == ["dog", "cat"] and image.token_positions == [[2], [5]]
    assert image.masks.dtype == np.uint8 and image.masks.shape == (2, 40, 60)
    assert np.array_equal(image.masks[1], cat) and image.boxes[0] == [4.0, 4.0, 17.0, 17.0]
    empty = reader.get("a", size=(8, 8))
    assert empty.nouns == [] and empty.masks.shape == (0, 8, 8)
    assert reader.rejects()["reason"].tolist() == ["unreadable image: x"]
    with pytest.raises(KeyError):
        reader.get("missing")


def test_resize_follows_the_method_rule() -> None:
    mask = _disk(40, 60, 20, 30, 7)
    expected = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(16, 16),
                             mode="bilinear", align_corners=False)[0, 0] > 0
    assert np.array_equal(mask_cache.resize_masks(mask[None], (16, 16))[0], expected.numpy().astype(np.uint8))


def test_memory_filesystem_and_lru(monkeypatch) -> None:
    cache = "memory://tc-test-cache"
    for number in range(3):
        rows = mask_cache.rows_frame(_image_rows(f"img{number}", {"dog": _disk(10, 10, 5, 5, 3)}))
        mask_cache.commit_shard(cache, f"shard-{number:05d}", rows)
    reader = mask_cache.MaskCache(cache, max_cached_shards=1)
    reads = []
    original = mask_cache._read_arrow
    monkeypatch.setattr(mask_cache, "_read_arrow", lambda uri, columns=None: reads.append(uri) or original(uri, columns))
    for image_id in ["img0", "img0", "img1", "img1", "img0"]:
        assert reader.get(image_id).nouns == ["dog"]
    assert len(reads) == 3  # one read per shard switch, none for repeats


def test_schema_is_enforced(tmp_path) -> None:
    rows = mask_cache.rows_frame(_image_rows("a", {"dog": _disk(10, 10, 5, 5, 3)})).drop(columns=["fingerprint"])
    with pytest.raises(ValueError, match="fingerprint"):
        mask_cache.commit_shard(str(tmp_path), "shard-00000", rows)
    with pytest.raises(ValueError):
        mask_cache.commit_shard(str(tmp_path), "../escape", mask_cache.rows_frame([]))
    assert mask_cache.completed_shards(str(tmp_path)) == {}


def test_concurrent_commits_keep_every_record(tmp_path) -> None:
    cache = str(tmp_path / "cache")

    def commit(number: int) -> None:
        rows = mask_cache.rows_frame(_image_rows(f"img{number}", {"dog": _disk(10, 10, 5, 5, 3)}))
        mask_cache.commit_shard(cache, f"shard-{number:05d}", rows)

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(mask_cache.completed_shards(cache)) == 8
    assert len(mask_cache.MaskCache(cache)) == 8


def test_failed_write_leaves_no_listed_shard(tmp_path, monkeypatch) -> None:
    cache = str(tmp_path / "cache")
    rows = mask_cache.rows_frame(_image_rows("a", {"dog": _disk(10, 10, 5, 5, 3)}))

    def broken(table, uri):
        raise OSError("disk full")

    monkeypatch.setattr(mask_cache, "write_table", broken)
    with pytest.raises(OSError):
        mask_cache.commit_shard(cache, "shard-00000", rows)
    assert mask_cache.completed_shards(cache) == {}
    assert len(mask_cache.MaskCache(cache)) == 0


def test_remove_shard(tmp_path) -> None:
    cache = str(tmp_path / "cache")
    for number in range(2):
        rows = mask_cache.rows_frame(_image_rows(f"img{number}", {}))
        mask_cache.commit_shard(cache, f"shard-{number:05d}", rows)
    mask_cache.remove_shard(cache, "shard-00001")
    assert list(mask_cache.completed_shards(cache)) == ["shard-00000"]
    assert mask_cache.MaskCache(cache).image_ids() == ["img0"]
    assert isinstance(mask_cache.MaskCache(cache).rejects(), pd.DataFrame)
