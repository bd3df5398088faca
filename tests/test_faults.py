"""Faults, short version: SIGKILL each stage twice then rerun; a disk that fills up mid-write.

``bench/faults.py`` is the full suite (10 seeded kill points per stage); this runs
one two-kill point per stage with the same checks, plus storage faults.
"""

from __future__ import annotations

import builtins
import errno
import logging
import random
import sys
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from tokencompose_core import mask_cache, storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import faults  # noqa: E402  (bench/faults.py; the fork server imports it by this name too)
from helpers import sample_run, train_run  # noqa: E402

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> faults.Runner:
    work = tmp_path_factory.mktemp("faults")
    faults.prepare(work)
    return faults.Runner(work)


@pytest.mark.parametrize("stage", faults.STAGES)
def test_sigkill_twice_then_rerun_equals_uninterrupted_run(runner: faults.Runner, stage: str) -> None:
    reference = runner.work / "reference" / stage
    _, times = runner.run(stage, reference)
    point = faults.kill_point(runner, stage, 0, reference, times, random.Random(f"make-test:{stage}"), kills=2)
    assert point.checks and all(outcome == "ok" for outcome in point.checks.values()), point.checks


# ----------------------------------------------------------------------------- storage faults


def _disk_fills_up(monkeypatch: pytest.MonkeyPatch, fragment: str) -> list[str]:
    """Writes to local paths containing ``fragment`` get half their bytes down, then ENOSPC."""
    failed: list[str] = []

    class HalfWritten:
        def __init__(self, handle) -> None:
            self.handle = handle

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            failed.append(self.handle.name)
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def fake_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        return HalfWritten(handle) if fragment in str(path) and "w" in mode else handle

    monkeypatch.setattr(storage, "open", fake_open, raising=False)  # shadows the builtin in storage only
    return failed


def _rows(image_id: str) -> pd.DataFrame:
    return mask_cache.rows_frame([mask_cache.shard_row(image_id, f"/{image_id}.png", "a dog", 4, 4, "fp")])


def test_full_disk_mid_shard_keeps_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = str(tmp_path / "cache")
    mask_cache.commit_shard(cache, "shard-00000", _rows("a"))
    before = {p: p.read_bytes() for p in Path(cache).rglob("*") if p.is_file()}
    failed = _disk_fills_up(monkeypatch, "shard-00001.parquet")
    with pytest.raises(storage.StorageError) as caught:
        mask_cache.commit_shard(cache, "shard-00001", _rows("b"))
    assert caught.value.errno == errno.ENOSPC and failed
    message = str(caught.value)
    assert "No space left on device" in message and str(Path(cache) / "rejects" / "shard-00001.parquet") in message
    after = {p: p.read_bytes() for p in Path(cache).rglob("*") if p.is_file()}
    assert after == before  # nothing new, nothing changed, no half-written temporary file left
    assert mask_cache.MaskCache(cache).image_ids() == ["a"]
    monkeypatch.undo()
    mask_cache.commit_shard(cache, "shard-00001", _rows("b"))  # space again: the rerun completes
    assert mask_cache.MaskCache(cache).image_ids() == ["a", "b"]


class FailingFileSystem(MemoryFileSystem):
    """An object store whose uploads of paths containing ``fail_on`` fail with ENOSPC."""

    protocol = "failingmem"
    fail_on: str | None = None

    def pipe_file(self, path, value, *args, **kwargs):
        if self.fail_on and self.fail_on in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().pipe_file(path, value, *args, **kwargs)


@pytest.mark.parametrize("fail_on", ["rejects/shard-00001", "shards/shard-00001", "_completed/shard-00001",
                                     "_completed.json"])
def test_failing_fsspec_write_leaves_every_listed_shard_whole(fail_on: str) -> None:
    fsspec.register_implementation(FailingFileSystem.protocol, FailingFileSystem, clobber=True)
    cache = f"failingmem://cache-{uuid.uuid4().hex}"
    FailingFileSystem.fail_on = None
    mask_cache.commit_shard(cache, "shard-00000", _rows("a"))
    FailingFileSystem.fail_on = fail_on
    try:
        with pytest.raises(storage.StorageError, match=f"could not write failingmem://.*{fail_on}.*No space left"):
            mask_cache.commit_shard(cache, "shard-00001", _rows("b"))
        listed = mask_cache.completed_shards(cache)
        # Only a failed rewrite of the merged manifest leaves shard-00001 committed (its marker is
        # written); it is then whole. Every other failure leaves it unlisted.
        assert set(listed) == ({"shard-00000", "shard-00001"} if fail_on == "_completed.json" else {"shard-00000"})
        reader = mask_cache.MaskCache(cache)
        assert reader.get("a").caption == "a dog" and len(reader.rejects()) == 0
    finally:
        FailingFileSystem.fail_on = None
        FailingFileSystem.store.clear()


def test_full_disk_during_a_checkpoint_keeps_the_older_checkpoints(runner: faults.Runner, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tokencompose_core.checkpoints import checkpoint_steps
    
    config = faults.stage_config("train", runner.work)
    config.train.max_steps = 4
    inputs = faults.prepare(runner.work)
    out = tmp_path / "run"
    failed = _disk_fills_up(monkeypatch, f".tmp-checkpoint-4{'/'}optimizer.pt")
    with pytest.raises(storage.StorageError, match="optimizer.pt.*No space left on device"):
        train_run(config, inputs["cache"], str(out))
    assert failed and checkpoint_steps(str(out)) == [2]
    faults.check_published("train", out)  # checkpoint-2 and the metrics read back whole
    monkeypatch.undo()
    assert train_run(config, inputs["cache"], str(out)).global_step == 4  # resumes from checkpoint-2
    assert checkpoint_steps(str(out)) == [2, 4]


def test_full_disk_while_sampling_keeps_the_finished_images(runner: faults.Runner, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tokencompose_core.sampling import Prompt

    config = faults.stage_config("sample", runner.work)
    model = faults.prepare(runner.work)["model"]
    prompts = [Prompt(0, "a dog"), Prompt(1, "a ball")]
    out = tmp_path / "samples"
    _disk_fills_up(monkeypatch, "p1_i0.png")
    with pytest.raises(storage.StorageError, match="p1_i0.png.*No space left on device"):
        sample_run(config, model, str(out), prompts)
    written = sorted(p.name for p in out.rglob("*.png"))
    assert written == ["p0_i0.png", "p0_i1.png"] and not (out / "index.parquet").exists()
    faults.check_published("sample", out)
    monkeypatch.undo()
    sample_run(config, model, str(out), prompts)
    assert storage.read_json(str(out / "stats.json"))["skipped"] == 2


def test_death_while_deleting_an_old_checkpoint_never_lists_a_broken_one(runner: faults.Runner, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from tokencompose_core.checkpoints import checkpoint_steps
    
    config = faults.stage_config("train", runner.work)
    config.train.max_steps, config.train.checkpoints_total_limit = 4, 1
    real_rmtree = shutil.rmtree

    def dies_half_way(path, *args, **kwargs):
        if "checkpoint-2" in str(path) and Path(path, "unet").is_dir():
            real_rmtree(Path(path, "unet"))  # the first half of the deletion, then the process dies
            raise SystemExit("killed while deleting checkpoint-2")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train_run(config, faults.prepare(runner.work)["cache"], str(out))
    monkeypatch.undo()
    assert checkpoint_steps(str(out))[-1] == 4
    faults.check_published("train", out)  # every listed checkpoint is whole


# ----------------------------------------------------------------------------- damaged checkpoints


def _scramble(path: Path) -> None:
    """Random bytes of the same size: only the content digest (or the load) can tell."""
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))


def _trained(runner: faults.Runner, out: Path, steps: int):
    from tokencompose_core.checkpoints import checkpoint_steps
    
    config = faults.stage_config("train", runner.work)
    config.train.max_steps = steps
    cache = faults.prepare(runner.work)["cache"]
    train_run(config, cache, str(out))
    assert checkpoint_steps(str(out)) == [2, 4]
    return config, cache


@pytest.mark.parametrize("manifest_rewritten", [False, True], ids=["content-differs", "passes-manifest-fails-load"])
def test_resume_passes_over_a_damaged_newest_checkpoint(runner: faults.Runner, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        manifest_rewritten: bool) -> None:
    from tokencompose_core.outputs import write_manifest
    from tokencompose_core.checkpoints import checkpoint_dir
    
    out = tmp_path / "run"
    config, cache = _trained(runner, out, 4)
    damaged = Path(checkpoint_dir(str(out), 4)) / "optimizer.pt"
    _scramble(damaged)
    if manifest_rewritten:  # damaged before the manifest was written: only loading it shows the damage
        write_manifest(str(damaged.parent))
    config.train.max_steps = 6
    with caplog.at_level(logging.INFO, logger="tokencompose_core.train"):
        assert train_run(config, cache, str(out)).global_step == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(damaged) in message and "damaged" in message for message in warnings), warnings
    assert any(f"resumed from {checkpoint_dir(str(out), 2)} at step 2" in r.getMessage() for r in caplog.records)
    faults.check_published("train", out)  # the re-saved checkpoint-4 and checkpoint-6 are whole


def test_no_whole_checkpoint_is_one_error_naming_them(runner: faults.Runner, tmp_path: Path) -> None:
    from tokencompose_core.checkpoints import CheckpointError, checkpoint_dir
    
    out = tmp_path / "run"
    config, cache = _trained(runner, out, 4)
    _scramble(Path(checkpoint_dir(str(out), 4)) / "optimizer.pt")
    (Path(checkpoint_dir(str(out), 2)) / "lr_scheduler.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as caught:
        train_run(config, cache, str(out))
    message = str(caught.value)
    assert "\n" not in message
    assert str(Path(checkpoint_dir(str(out), 4)) / "optimizer.pt") in message
    assert str(Path(checkpoint_dir(str(out), 2)) / "lr_scheduler.pt") in message
