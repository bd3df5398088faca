"""A cache hit only when the outputs are whole: damaged or missing artefacts are redone, through the CLI.

After a first `tokencompose run`, each damage below is made by hand and the same
command is run again: it must succeed, redo exactly the damaged stage's missing
part (restoring the very same bytes), and leave every other stage a cache hit.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from helpers import run_pipeline, stage_folders
from tokencompose_core import outputs


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _one(folder: str, pattern: str) -> Path:
    return sorted(Path(folder).glob(pattern))[0]


def _edit_digit(path: Path, mtime: str = "new") -> None:
    """Change one digit in place: the same size. ``mtime``: "new" (as any edit leaves it),
    or "restored" (put back as it was, so only the content tells)."""
    before = path.stat()
    text = path.read_text()
    at = next(i for i, char in enumerate(text) if char.isdigit())
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])
    if mtime == "restored":
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _append_space(path: Path) -> None:
    """An edit that changes the size, dated after the record."""
    path.write_text(path.read_text() + " ")
    os.utime(path, (time.time() + 60, time.time() + 60))


@pytest.mark.slow
def test_damaged_or_missing_outputs_are_redone_and_the_rest_stays_cached(tiny_pipeline):
    # The session's pipeline run: every damage below is repaired to the same bytes, so the
    # other tests reading it find it as it was.
    manifest, argv, first = tiny_pipeline["manifest"], tiny_pipeline["settings"], tiny_pipeline["summary"]
    folders = stage_folders(first)
    png = _one(folders["sample"], "images/*/*.png")
    unet = _one(folders["train"], "unet/*.safetensors")
    shard = _one(folders["masks"], "shards/*.parquet")
    scores = first["stages"]["score"]["summary"]["scores"][0]
    multigen = Path(scores, "multigen.json")
    folders_of = {**folders, "scores": scores}
    originals = {path: path.read_bytes() for path in (png, unet, shard, multigen)}

    damages = [  # (what is done, the file it hits, the stage that must run again, the folder it is in)
        (lambda: png.unlink(), png, "sample", "sample"),
        (lambda: _truncate(png), png, "sample", "sample"),
        (lambda: shutil.rmtree(unet.parent), unet, "train", "train"),
        (lambda: unet.unlink(), unet, "train", "train"),  # the weights alone: config.json stays
        (lambda: _truncate(shard), shard, "masks", "masks"),
        # Damage must be repaired, never adopted into the record, however it is dated.
        (lambda: _edit_digit(multigen), multigen, "score", "scores"),
        (lambda: _edit_digit(multigen, mtime="restored"), multigen, "score", "scores"),
        (lambda: _append_space(multigen), multigen, "score", "scores"),
    ]
    for damage, path, stage, folder in damages:
        damage()
        assert not outputs.is_whole(folders_of[folder])
        summary, states = run_pipeline(manifest, argv)
        assert path.read_bytes() == originals[path], f"{path} was not restored as it was"
        assert stage_folders(summary) == folders
        assert "Completed" in states[stage], (stage, states)
        # The restored bytes are the same, so every stage after it finds its outputs as they were.
        for other, names in states.items():
            if other != stage:
                assert names == {"Cached"}, (stage, other, states)
    for stage, folder in folders_of.items():
        assert outputs.problems(folder) == [], stage
