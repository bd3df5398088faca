"""The authors' released training metadata imports with no token-span rejects.

``tests/data/tokencompose_metadata.jsonl.gz`` is the authors' ``metadata.jsonl``
(GitHub mlpc-ucsd/TokenCompose, commit 5633f81; 4,526 rows of ``file_name``,
``text`` and ``attn_list``), gzipped. Their masks are not shipped: every mask path
points to one small PNG here, so the import computes every noun's token span from the
released caption and noun, as it does on the real data, without the 13k mask files.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tokencompose_core.manifest import import_reference
from tokencompose_core.mask_cache import MaskCache
from tokencompose_core.config import ModelsConfig
from tokencompose_core.stages.nouns import noun_positions
from tokencompose_core.storage import read_parquet

METADATA = Path(__file__).parent / "data" / "tokencompose_metadata.jsonl.gz"
RELEASED_ROWS = 4526


def _metadata_with_one_mask(folder: Path) -> tuple[str, int, int]:
    """The released rows with every mask path on ``mask.png``; (URI, masked nouns, null nouns)."""
    Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(folder / "mask.png")
    rows = [json.loads(line) for line in gzip.decompress(METADATA.read_bytes()).decode("utf-8").splitlines()]
    assert len(rows) == RELEASED_ROWS
    masked = nulls = 0
    for row in rows:
        row["attn_list"] = [[noun, None if path is None else "mask.png"] for noun, path in row["attn_list"]]
        masked += sum(path is not None for _, path in row["attn_list"])
        nulls += sum(path is None for _, path in row["attn_list"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder / "metadata.jsonl"), masked, nulls


def test_released_metadata_has_no_token_span_rejects(tmp_path: Path) -> None:
    metadata, masked, nulls = _metadata_with_one_mask(tmp_path)
    cache = str(tmp_path / "cache")
    result = import_reference(metadata, cache, noun_positions(ModelsConfig()), shard_size=1024)
    assert result["images"] == RELEASED_ROWS
    rejects = MaskCache(cache).rejects()
    # The only rejects are the nouns the authors released without a mask.
    assert rejects["reason"].value_counts().to_dict() == {"noun without detection": nulls}
    shards = [read_parquet(str(path)) for path in sorted((tmp_path / "cache").rglob("shard-*.parquet"))
              if "rejects" not in path.parts]
    assert sum(int(shard["noun"].notna().sum()) for shard in shards) == masked
