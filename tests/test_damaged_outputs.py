"""A cache hit only when the outputs are whole: damaged or missing artefacts are redone, through the CLI.

After a first `tokencompose run`, each damage below is made by hand and the same
command is run again: it must succeed, redo exactly the damaged stage's missing
part (restoring the very same bytes), and leave every other stage a cache hit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from test_orchestration import _photo_manifest
from test_rerun_table import BASE, _outputs, _run
from tokencompose_core import outputs


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _one(folder: str, pattern: str) -> Path:
    return sorted(Path(folder).glob(pattern))[0]


@pytest.mark.slow
def test_damaged_or_missing_outputs_are_redone_and_the_rest_stays_cached(prefect_harness, tmp_path, capsys):
    manifest = _photo_manifest(tmp_path)
    argv = [f"storage.root={tmp_path / 'root'}", *BASE]
    first, _ = _run(capsys, manifest, argv)
    folders = _outputs(first)
    png = _one(folders["sample"], "images/*/*.png")
    unet = _one(folders["train"], "unet/*.safetensors")
    shard = _one(folders["masks"], "shards/*.parquet")
    originals = {path: path.read_bytes() for path in (png, unet, shard)}

    damages = [  # (what is done, the file it hits, the stage that must run again)
        (lambda: png.unlink(), png, "sample"),
        (lambda: _truncate(png), png, "sample"),
        (lambda: shutil.rmtree(unet.parent), unet, "train"),
        (lambda: _truncate(shard), shard, "masks"),
    ]
    for damage, path, stage in damages:
        damage()
        assert not outputs.is_whole(folders[stage])
        summary, states = _run(capsys, manifest, argv)
        assert path.read_bytes() == originals[path], f"{path} was not restored as it was"
        assert _outputs(summary) == folders
        assert "Completed" in states[stage], (stage, states)
        # The restored bytes are the same, so every stage after it finds its outputs as they were.
        for other, names in states.items():
            if other != stage:
                assert names == {"Cached"}, (stage, other, states)
    for stage, folder in folders.items():
        assert outputs.problems(folder, deep=True) == [], stage
