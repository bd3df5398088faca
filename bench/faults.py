"""Fault injection: SIGKILL the mask stage, training and sampling at seeded points, rerun, check.

    python bench/faults.py                          # full suite: 10 kill points per stage
    python bench/faults.py --points 3 --stages masks sample --json faults.json

Each stage runs as its library call (no Prefect) in a child process. Children are
forked from a multiprocessing "forkserver" that imported torch and the pipeline
once, so a kill point costs the stage's own work, not a 10-second import; each
child still is a separate process that dies by SIGKILL with no chance to clean up.

A kill point is seeded: the parent waits until the output holds ``k`` committed
units (mask shards, checkpoints, images; ``k`` random), then sleeps a random
fraction of the time the next unit took in the uninterrupted reference run, and
sends SIGKILL. Then it checks:

1. at the kill: every published artefact (parquet, json, safetensors, .pt, png)
   reads back whole, and each committed unit is complete;
2. a rerun to completion does not redo committed work (shards reported skipped,
   images not rewritten, training resumed from the newest checkpoint);
3. the result equals the reference run's: mask-cache rows equal, images
   bit-identical, training ends at ``max_steps`` with bit-identical weights.

Temporary files of interrupted writes (``*.tmp-*``) may stay behind; the check is
that no reader ever lists one as an artefact.

Storage faults: the n-th file write of a fresh run fails half-way with ENOSPC.
Damaged checkpoints (training): one file of the newest checkpoint of a finished
run is changed, cut short, deleted, or replaced under a rewritten manifest; the
rerun must name the file, resume from the checkpoint before and end equal.
The CLI probe: after a finished `tokencompose run`, a pickle planted in every
result-cache record, a deleted or cut sample PNG, a deleted final ``unet/`` and a
cut mask shard; the same command again must succeed, keep its output folders,
restore the damaged file bit-identical and run none of the planted code.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
STAGES = ("masks", "train", "sample")
# Imported once by the fork server, before any child is forked.
PRELOAD = ["torch", "tokencompose_core.grounding", "tokencompose_core.train", "tokencompose_core.sampling"]
POLL_S = 0.002
# Run sizes: several units per stage, seconds per run on a CPU.
MASK_IMAGES, SHARD_SIZE = 12, 2
TRAIN_STEPS, CHECKPOINT_EVERY = 8, 2
PROMPTS, IMAGES_PER_PROMPT = 4, 2


# ----------------------------------------------------------------------------- the stages


def stage_config(stage: str, work: Path) -> Any:
    """The tiny profile, shrunk so a run has several units and takes seconds."""
    from tokencompose_core.config import load_config

    common = [f"storage.root={work}", f"models.cache_dir={work / 'models'}"]
    per_stage = {
        "masks": [f"masks.shard_size={SHARD_SIZE}", "masks.batch_size=2", "masks.image_size=64",
                  "masks.max_boxes=4"],
        "train": [f"train.max_steps={TRAIN_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                  "train.checkpoints_total_limit=2", "train.log_every=1", "train.num_workers=0",
                  "score.heldout_images=0"],
        "sample": [f"sample.max_prompts={PROMPTS}", f"sample.images_per_prompt={IMAGES_PER_PROMPT}",
                   "sample.batch_size=2", "sample.num_inference_steps=3"],
    }
    return load_config("tiny", common + per_stage[stage])


def _shapes_image(seed: int, side: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((side, side, 3), rng.integers(60, 200, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, side - 20, 2)
        image[y : y + 20, x : x + 20] = rng.integers(0, 256, 3)
    return image


def prepare(work: Path) -> dict[str, str]:
    """Inputs of the three stages under ``work`` (idempotent): nouns table, mask cache, model."""
    from tokencompose_core import storage
    from tokencompose_core.config import WorldConfig
    from tokencompose_core.stages.nouns import nouns_table, write_nouns
    from tokencompose_core.models import clip_tokenizer, resolve_diffusion_dir
    from tokencompose_core.synthetic import png_bytes, train_samples, world_fingerprint, write_split

    inputs = {"nouns": str(work / "inputs" / "nouns" / "nouns.parquet"),
              "cache": str(work / "inputs" / "world" / "masks")}
    if not storage.exists(inputs["nouns"]):
        captions = ["a dog and a ball on the grass", "a red cup next to a laptop", "a cat under a chair"]
        rows = []
        for index in range(MASK_IMAGES):
            uri = str(work / "inputs" / "images" / f"img{index:02d}.png")
            storage.atomic_write_bytes(uri, png_bytes(_shapes_image(index)))
            rows.append({"id": f"img{index:02d}", "image": uri, "captions": [captions[index % 3]]})
        import pandas as pd

        table, rejects = nouns_table(pd.DataFrame(rows), clip_tokenizer())
        write_nouns(table, rejects, str(work / "inputs" / "nouns"))
    if not storage.exists(storage.join(inputs["cache"], "_completed.json")):
        world = WorldConfig(image_size=32, train_images=8, seed=3)
        write_split(train_samples(world), str(work / "inputs" / "world" / "nouns"), inputs["cache"], clip_tokenizer(),
                    world_fingerprint(world))
    inputs["model"] = resolve_diffusion_dir(stage_config("sample", work).models)
    return inputs


def run_stage(stage: str, work: Path, out: Path) -> dict[str, Any]:
    """The stage's library call, as its Prefect task makes it; returns a small summary."""
    config = stage_config(stage, work)
    inputs = prepare(work)
    if stage == "masks":
        return _run_masks(config, inputs["nouns"], str(out))
    if stage == "train":
        from tokencompose_core.checkpoints import checkpoint_steps
        from tokencompose_core.train import train

        before = checkpoint_steps(str(out))
        result = train(config.train, config.models, inputs["cache"], str(out), config.score.heldout_images)
        return {"resumed_from": before[-1] if before else 0, "global_step": result.global_step}
    from tokencompose_core.sampling import load_prompts, sample

    prompts = load_prompts(config.sample.prompts, config.sample.max_prompts)
    return {"index_uri": sample(config.sample, config.models, inputs["model"], str(out), prompts)}


def _run_masks(config: Any, nouns_uri: str, cache_uri: str) -> dict[str, Any]:
    from tokencompose_core import storage
    from tokencompose_core.grounding import GroundedSam, plan_shards, run_mask_shard
    from tokencompose_core.stages import stage_fingerprint

    grounder: list[GroundedSam] = []

    def factory() -> GroundedSam:  # loaded once, and only when a shard has work
        if not grounder:
            grounder.append(GroundedSam.from_config(config.models, config.masks))
        return grounder[0]

    stage_fp = stage_fingerprint(config, "masks")
    results = [run_mask_shard(rows, cache_uri, name, factory, stage_fp, config.masks.batch_size,
                              config.masks.max_image_pixels)
               for name, rows in plan_shards(storage.read_parquet(nouns_uri), config.masks.shard_size)]
    return {"skipped": sorted(r["shard"] for r in results if r["skipped"]), "shards": len(results)}


def _warm_up() -> None:
    """A child that does nothing: starts the fork server before anything is timed."""


def _child(stage: str, work: str, out: str, result_path: str) -> None:
    """Child process entry: one thread, so every run computes bit-identical numbers."""
    import torch

    torch.set_num_threads(1)
    result = run_stage(stage, Path(work), Path(out))
    Path(result_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- units and checks


def units(stage: str, out: Path) -> int:
    """Committed units so far: mask shards, checkpoints (by step), or finished images."""
    if stage == "masks":
        markers = out / "_completed"
        return sum(1 for p in markers.glob("*.json")) if markers.is_dir() else 0
    if stage == "train":
        from tokencompose_core.checkpoints import checkpoint_steps

        steps = checkpoint_steps(str(out))
        return steps[-1] // CHECKPOINT_EVERY if steps else 0
    images = out / "images"
    return sum(1 for p in images.rglob("*.png")) if images.is_dir() else 0


def total_units(stage: str) -> int:
    return {"masks": MASK_IMAGES // SHARD_SIZE, "train": TRAIN_STEPS // CHECKPOINT_EVERY,
            "sample": PROMPTS * IMAGES_PER_PROMPT}[stage]


def is_temporary(path: Path, root: Path) -> bool:
    """Leftovers of interrupted writes: ``x.tmp-<id>``, ``.tmp-*`` and ``.old-*`` folders."""
    return any(".tmp-" in part or part.startswith(".old-") for part in path.relative_to(root).parts)


def _read_back(path: Path) -> None:
    """Read a published file completely; raises on any truncation or corruption."""
    suffix = path.suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.read_table(path)
    elif suffix == ".json":
        json.loads(path.read_text("utf-8"))
    elif suffix == ".jsonl":
        for line in filter(None, path.read_text("utf-8").splitlines()):
            json.loads(line)
    elif suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(str(path))
    elif suffix == ".pt":
        import torch

        torch.load(path, map_location="cpu", weights_only=True)


def check_published(stage: str, out: Path) -> dict[str, int]:
    """Every non-temporary artefact reads back; committed units are whole. Counts files."""
    files = temporary = 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if is_temporary(path, out):
            temporary += 1
            continue
        if "tensorboard" in path.relative_to(out).parts:
            continue  # event logs are appended, not published; not an artefact
        try:
            _read_back(path)
        except Exception as error:  # any failure here is a corrupt artefact
            raise AssertionError(f"{stage}: published file {path} does not read back: {error!r}") from error
        files += 1
    _check_units(stage, out)
    return {"files": files, "temporary": temporary}


def _check_units(stage: str, out: Path) -> None:
    if stage == "masks":
        from tokencompose_core import mask_cache

        for name, record in mask_cache.completed_shards(str(out)).items():
            rows = mask_cache._read_table(str(out / "shards" / f"{name}.parquet"))
            assert len(rows) == record["rows"], f"shard {name}: {len(rows)} rows, marker says {record['rows']}"
            assert (out / "rejects" / f"{name}.parquet").is_file(), f"shard {name} has no rejects file"
    elif stage == "train":
        from tokencompose_core.outputs import verify_manifest
        from tokencompose_core.checkpoints import checkpoint_dir, checkpoint_steps

        for step in checkpoint_steps(str(out)):
            folder = Path(checkpoint_dir(str(out), step))
            problems = verify_manifest(str(folder))
            assert not problems, f"checkpoint-{step} does not match its manifest: {problems}"
            state = json.loads((folder / "state.json").read_text())
            assert state["global_step"] == step, f"checkpoint-{step} says step {state['global_step']}"
            for name in ("unet/diffusion_pytorch_model.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng-0.pt"):
                assert (folder / name).is_file(), f"checkpoint-{step} lacks {name}"


def snapshot(stage: str, out: Path) -> dict[str, Any]:
    """What the rerun must leave alone: committed shards, images (inode, mtime), newest checkpoint."""
    if stage == "masks":
        from tokencompose_core import mask_cache

        return {"shards": sorted(mask_cache.completed_shards(str(out)))}
    if stage == "train":
        from tokencompose_core.checkpoints import checkpoint_steps

        steps = checkpoint_steps(str(out))
        return {"checkpoint": steps[-1] if steps else 0}
    images = out / "images"
    files = sorted(images.rglob("*.png")) if images.is_dir() else []
    return {"images": {str(p.relative_to(out)): [p.stat().st_ino, p.stat().st_mtime_ns] for p in files}}


def check_not_redone(stage: str, at_kill: dict[str, Any], result: dict[str, Any], out: Path) -> None:
    if stage == "masks":
        assert result["skipped"] == at_kill["shards"], f"skipped {result['skipped']}, committed {at_kill['shards']}"
    elif stage == "train":
        assert result["resumed_from"] == at_kill["checkpoint"], (
            f"resumed from step {result['resumed_from']}, newest checkpoint was {at_kill['checkpoint']}")
    else:
        now = snapshot(stage, out)["images"]
        rewritten = [name for name, stat in at_kill["images"].items() if now.get(name) != stat]
        assert not rewritten, f"images rewritten by the rerun: {rewritten}"


def check_equal(stage: str, out: Path, reference: Path) -> None:
    """The rerun's final output equals the uninterrupted run's."""
    if stage == "masks":
        _equal_masks(out, reference)
    elif stage == "train":
        _equal_train(out, reference)
    else:
        _equal_samples(out, reference)


def _equal_masks(out: Path, reference: Path) -> None:
    from tokencompose_core import mask_cache

    expected = mask_cache.completed_shards(str(reference))
    assert set(mask_cache.completed_shards(str(out))) == set(expected), "different shard sets"
    for name in expected:
        for folder in ("shards", "rejects"):
            got = mask_cache._read_table(str(out / folder / f"{name}.parquet"))
            want = mask_cache._read_table(str(reference / folder / f"{name}.parquet"))
            assert got.to_json() == want.to_json(), f"{folder}/{name} differs from the uninterrupted run"


def _equal_train(out: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    import torch

    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    want = load_file(str(reference / "unet" / "diffusion_pytorch_model.safetensors"))
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert got.keys() == want.keys() and not different, f"final weights differ: {different[:3]}"

    def losses(run: Path) -> list[tuple[int, float]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    assert losses(out) == losses(reference), "metrics.jsonl steps or losses differ from the uninterrupted run"


def _equal_samples(out: Path, reference: Path) -> None:
    import pandas as pd

    index = pd.read_parquet(out / "index.parquet")
    ref_index = pd.read_parquet(reference / "index.parquet")
    columns = ["prompt_id", "image_index", "seed", "prompt", "model_fingerprint"]
    assert index[columns].equals(ref_index[columns]), "index.parquet differs from the uninterrupted run"
    for uri, ref_uri in zip(index["image_uri"], ref_index["image_uri"]):
        assert Path(uri).read_bytes() == Path(ref_uri).read_bytes(), f"{uri} is not bit-identical"


# ----------------------------------------------------------------------------- processes


class Runner:
    """Starts stage children from a fork server that already imported the pipeline."""

    def __init__(self, work: Path) -> None:
        if str(BENCH_DIR) not in sys.path:
            sys.path.insert(0, str(BENCH_DIR))  # the fork server imports this module by name
        self.work = work
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD + ["faults"])
        from faults import _warm_up

        warm = self.context.Process(target=_warm_up)
        warm.start()
        warm.join()

    def start(self, stage: str, out: Path) -> tuple[multiprocessing.Process, Path]:
        result = out.parent / f"{out.name}.result-{time.monotonic_ns()}.json"
        from faults import _child  # the fork server's copy of this function

        process = self.context.Process(target=_child, args=(stage, str(self.work), str(out), str(result)))
        process.start()
        return process, result

    def run(self, stage: str, out: Path, timeout: float = 600.0) -> tuple[dict[str, Any], list[float]]:
        """Run to completion; returns the result and when each unit appeared (s after start)."""
        started = time.monotonic()
        process, result_path = self.start(stage, out)
        times: list[float] = []
        while process.is_alive() and time.monotonic() - started < timeout:
            while units(stage, out) > len(times):
                times.append(time.monotonic() - started)
            time.sleep(POLL_S)
        process.join(timeout=max(0.0, timeout - (time.monotonic() - started)))
        if process.is_alive():  # timed out
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{stage} run into {out} failed with exit code {process.exitcode}")
        times += [time.monotonic() - started] * (total_units(stage) - len(times))
        return json.loads(result_path.read_text()), times

    def kill_at(self, stage: str, out: Path, unit: int, delay: float) -> dict[str, Any]:
        """Start a run, SIGKILL it ``delay`` seconds after ``unit`` units exist; what was there."""
        started = time.monotonic()
        process, _ = self.start(stage, out)
        while process.is_alive() and units(stage, out) < unit:
            time.sleep(POLL_S)
        time.sleep(delay)
        finished = not process.is_alive()
        if not finished:
            os.kill(process.pid, signal.SIGKILL)
        process.join()
        return {"killed_after_s": round(time.monotonic() - started, 3), "finished_first": finished,
                "exitcode": process.exitcode}


# ----------------------------------------------------------------------------- storage faults


class DiskFull:
    """Make the ``n``-th file write through ``tokencompose_core.storage`` (1-based) put down half
    its bytes and then fail with ENOSPC, as a disk that fills up mid-write; counts writes."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.writes = 0
        self.failed_path: str | None = None

    def __enter__(self) -> "DiskFull":
        import builtins

        from tokencompose_core import storage

        def counting_open(path, mode="r", *args, **kwargs):
            handle = builtins.open(path, mode, *args, **kwargs)
            if "w" not in mode:
                return handle
            self.writes += 1
            return _HalfThenFull(handle, self) if self.writes == self.fail_at else handle

        storage.open = counting_open  # shadows the builtin inside storage only
        return self

    def __exit__(self, *exc: Any) -> None:
        from tokencompose_core import storage

        del storage.open


class _HalfThenFull:
    def __init__(self, handle: Any, owner: DiskFull) -> None:
        self.handle, self.owner = handle, owner

    def write(self, data: bytes) -> int:
        import errno

        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        self.owner.failed_path = self.handle.name
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> "_HalfThenFull":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()


def storage_fault_point(stage: str, work: Path, number: int, fail_at: int, reference: Path) -> dict[str, Any]:
    """ENOSPC at the ``fail_at``-th write of a fresh run; then the checks and a clean rerun."""
    from tokencompose_core.storage import StorageError

    out = work / "storage-faults" / f"{stage}-{number:02d}"
    record: dict[str, Any] = {"stage": stage, "point": number, "fail_at_write": fail_at, "checks": {}}
    point = KillPoint(stage, number, unit=0, fraction=0.0)
    error: Exception | None = None
    with DiskFull(fail_at) as disk:
        try:
            run_stage(stage, work, out)
        except Exception as raised:  # judged below: it must be a StorageError that says what happened
            error = raised
    failed = disk.failed_path.rsplit(".tmp-", 1)[0] if disk.failed_path else None
    record["failed_file"] = "/".join(Path(failed).parts[-2:]) if failed else None
    named = (isinstance(error, StorageError) and "No space left on device" in str(error)
             and str(record["failed_file"]) in str(error))
    _checked(point, "error names the file and the cause", lambda: _assert(named, repr(error)))
    counts = _checked(point, "published artefacts read back", lambda: check_published(stage, out))
    record["temporary_left"] = counts["temporary"] if counts else None
    try:
        run_stage(stage, work, out)
    except Exception as error:  # recorded, so one failing point does not end the sweep
        point.checks["rerun completes"] = f"FAILED: {error!r}"
    else:
        point.checks["rerun completes"] = "ok"
        _checked(point, "equal to the uninterrupted run", lambda: check_equal(stage, out, reference))
    record["checks"] = point.checks
    return record


def storage_sweep(work: Path, stages: list[str], points: int, seed: int) -> list[dict[str, Any]]:
    """``points`` seeded write positions per stage (every write when there are fewer)."""
    import torch

    torch.set_num_threads(1)  # as the reference children, so reruns are bit-identical
    records = []
    for stage in stages:
        with DiskFull() as counter:
            run_stage(stage, work, work / "storage-faults" / f"{stage}-count")
        positions = list(range(1, counter.writes + 1))
        random.Random(f"{seed}:{stage}:storage").shuffle(positions)
        reference = work / "reference" / stage
        records += [storage_fault_point(stage, work, n, at, reference)
                    for n, at in enumerate(sorted(positions[:points]))]
    return records


# ----------------------------------------------------------------------------- damaged checkpoints

# How the newest checkpoint of a finished run is damaged: bytes changed in place (same size),
# cut short, deleted, or replaced by random bytes *before* the manifest was written (so the
# manifest vouches for them and only loading the file shows the damage).
DAMAGES = ("same-size bytes", "truncated", "deleted", "random bytes, manifest rewritten")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def _damage(path: Path, kind: str, rng: random.Random) -> None:
    from tokencompose_core.outputs import write_manifest

    data = path.read_bytes()
    if kind == "same-size bytes":
        start = rng.randrange(len(data))
        path.write_bytes(data[:start] + bytes(b ^ 0xFF for b in data[start : start + 64]) + data[start + 64 :])
    elif kind == "truncated":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "deleted":
        path.unlink()
    else:
        path.write_bytes(rng.randbytes(len(data)))
        folder = next(parent for parent in path.parents if parent.name.startswith("checkpoint-"))
        write_manifest(str(folder))


def damage_point(work: Path, number: int, rng: random.Random, reference: Path) -> dict[str, Any]:
    """Damage one file of the newest checkpoint of a copy of the finished reference run, rerun
    with a resume: it must warn naming the file, resume from the checkpoint before, and end
    equal to the reference."""
    import shutil

    from tokencompose_core.outputs import MANIFEST_NAME
    from tokencompose_core.checkpoints import checkpoint_dir, checkpoint_steps

    out = work / "damage" / f"train-{number:02d}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(reference, out)
    steps = checkpoint_steps(str(out))
    newest = Path(checkpoint_dir(str(out), steps[-1]))
    kind = rng.choice(DAMAGES)
    # Without state.json a checkpoint is not listed at all, so deleting it damages nothing.
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                   and not (kind == "deleted" and p.name == "state.json"))
    target = rng.choice(files)
    _damage(target, kind, rng)
    record: dict[str, Any] = {"stage": "train", "point": number, "damage": kind,
                              "file": str(target.relative_to(newest)), "checks": {}}
    point = KillPoint("train", number, unit=0, fraction=0.0)
    handler, logger = _Records(), logging.getLogger("tokencompose_core.train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = run_stage("train", work, out)
    except Exception as error:  # recorded, so one failing point does not end the sweep
        point.checks["rerun completes"] = f"FAILED: {error!r}"
        return {**record, "checks": point.checks}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    point.checks["rerun completes"] = "ok"
    warned = [m for lvl, m in handler.messages if lvl == logging.WARNING and str(target) in m]
    _checked(point, "a warning names the damaged file", lambda: _assert(bool(warned), handler.messages))
    resumed = f"resumed from {checkpoint_dir(str(out), steps[-2])} at step {steps[-2]}"
    _checked(point, "resumed from the checkpoint before",
             lambda: _assert(any(resumed in m for _, m in handler.messages), handler.messages))
    _checked(point, "final step count", lambda: _assert(result["global_step"] == TRAIN_STEPS, result))
    _checked(point, "equal to the uninterrupted run", lambda: check_equal("train", out, reference))
    _checked(point, "final artefacts read back", lambda: check_published("train", out))
    return {**record, "checks": point.checks}


def damage_sweep(work: Path, points: int, seed: int) -> list[dict[str, Any]]:
    """``points`` seeded damaged-checkpoint points of the training reference run."""
    import torch

    torch.set_num_threads(1)  # as the reference children, so reruns are bit-identical
    rng = random.Random(f"{seed}:train:damage")
    return [damage_point(work, n, rng, work / "reference" / "train") for n in range(points)]


def damage_markdown(records: list[dict[str, Any]]) -> str:
    """One line per damage point: what was damaged, what the checks said."""
    lines = ["| point | damage | file | checks failed |", "|---|---|---|---|"]
    for r in records:
        failed = sum(outcome != "ok" for outcome in r["checks"].values())
        lines.append(f"| {r['point']} | {r['damage']} | `{r['file']}` | {failed} of {len(r['checks'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the CLI probe

# A hostile-but-realistic user's sequences through `tokencompose run` (Prefect, the result
# cache, every stage): each damage is made after a finished run, the same command is run
# again, and it must succeed and restore exactly the damaged output, running no foreign code.
PROBE_SETTINGS = ["masks.shard_size=2", "masks.batch_size=2", "train.max_steps=2", "train.batch_size=1",
                  "train.checkpoint_every=2", "train.resolution=32", "sample.max_prompts=1",
                  "sample.images_per_prompt=1", "sample.num_inference_steps=2", "score.heldout_images=2",
                  "score.report_overlays=0"]


class _Planted:
    """Unpickling it writes ``proof``: the sign that a cache hit ran code planted in the storage."""

    def __init__(self, proof: str) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


def _cli(work: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`tokencompose ARGV` in a subprocess, with the probe's own Prefect home (and local server)."""
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)


def _cli_run(work: Path, manifest: str) -> dict[str, str]:
    """One `tokencompose run` in a subprocess; each stage's output folder."""
    done = _cli(work, "run", "-p", "tiny", "--input", manifest, f"storage.root={work / 'root'}", *PROBE_SETTINGS)
    if done.returncode != 0:
        raise RuntimeError(f"tokencompose run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    stages = json.loads(done.stdout[done.stdout.index("{"):])["stages"]
    return {stage: str(Path(info["output_uri"]).parent) if Path(info["output_uri"]).suffix else info["output_uri"]
            for stage, info in stages.items()}


def _plant_pickles(root: Path, proof: Path) -> Path:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    planted = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(picklelib="cloudpickle")),
                           result=_Planted(str(proof))).serialize()
    records = [path for path in (root / "_prefect" / "results").iterdir() if path.is_file()]
    for record in records:
        record.write_bytes(planted)
    return records[0]


def probe_sweep(work: Path) -> list[dict[str, Any]]:
    """The probe's sequences: a planted pickle in every cache record, a deleted and a cut
    sample PNG, a deleted final ``unet/``, a cut mask shard."""
    from tokencompose_core import storage
    from tokencompose_core.synthetic import png_bytes

    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, caption in enumerate(["a dog and a ball on the grass", "a red cup next to a laptop",
                                     "a cat under a chair"]):
        uri = str(work / f"img{index}.png")
        storage.atomic_write_bytes(uri, png_bytes(_shapes_image(index)))
        rows.append(json.dumps({"image": uri, "captions": [caption]}) + "\n")
    manifest = work / "manifest.jsonl"
    manifest.write_text("".join(rows))
    folders = _cli_run(work, str(manifest))
    png = sorted(Path(folders["sample"]).glob("images/*/*.png"))[0]
    unet = sorted(Path(folders["train"]).glob("unet/*.safetensors"))[0]
    shard = sorted(Path(folders["masks"]).glob("shards/*.parquet"))[0]
    proof = work / "planted-code-ran"
    sequences = [
        ("pickle in every cache record", lambda: _plant_pickles(work / "root", proof), None),
        ("sample PNG deleted", png.unlink, png),
        ("sample PNG cut short", lambda: png.write_bytes(png.read_bytes()[: png.stat().st_size // 2]), png),
        ("final unet/ deleted", lambda: shutil.rmtree(unet.parent), unet),
        ("mask shard cut short", lambda: shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2]), shard),
    ]
    records = []
    for name, damage, target in sequences:
        before = target.read_bytes() if target else None
        damage()
        started = time.monotonic()
        checks = {}
        try:
            after = _cli_run(work, str(manifest))
            checks["run succeeds"] = "ok"
            checks["same output folders"] = "ok" if after == folders else f"{after} != {folders}"
            if target:
                checks["restored bit-identical"] = "ok" if target.read_bytes() == before else "differs"
        except RuntimeError as error:
            checks["run succeeds"] = str(error)
        checks["no planted code ran"] = "ok" if not proof.exists() else "the planted command ran"
        records.append({"stage": "cli", "point": name, "seconds": round(time.monotonic() - started, 1),
                        "checks": checks})
    _cli(work, "server", "stop")
    return records


def probe_markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| CLI probe (`tokencompose run` again after) | checks | seconds |", "|---|---|---|"]
    for record in records:
        bad = {name: outcome for name, outcome in record["checks"].items() if outcome != "ok"}
        lines.append(f"| {record['point']} | {'all ok' if not bad else bad} | {record['seconds']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the suite


@dataclass
class KillPoint:
    stage: str
    point: int
    unit: int  # committed units waited for before the delay
    fraction: float  # of the reference time of the next unit
    killed_after_s: float = 0.0
    finished_first: bool = False  # the run ended before the kill landed
    units_at_kill: int = 0
    files_at_kill: int = 0
    temporary_at_kill: int = 0
    rerun_s: float = 0.0
    checks: dict[str, str] = field(default_factory=dict)


def _checked(point: KillPoint, name: str, check: Callable[[], Any]) -> Any:
    try:
        value = check()
    except AssertionError as error:
        point.checks[name] = f"FAILED: {error}"
        return None
    point.checks[name] = "ok"
    return value


def kill_point(runner: Runner, stage: str, number: int, reference: Path, times: list[float],
               rng: random.Random, kills: int = 1) -> KillPoint:
    """``kills`` seeded SIGKILLs of one output folder, a rerun, and every check."""
    out = runner.work / "points" / f"{stage}-{number:02d}"
    point = KillPoint(stage, number, unit=0, fraction=0.0)
    for _ in range(kills):
        point.unit = rng.randrange(total_units(stage))
        point.fraction = round(rng.random(), 3)
        previous = times[point.unit - 1] if point.unit else 0.0
        report = runner.kill_at(stage, out, point.unit, point.fraction * (times[point.unit] - previous))
        point.killed_after_s, point.finished_first = report["killed_after_s"], report["finished_first"]
        counts = _checked(point, "published artefacts read back", lambda: check_published(stage, out))
        if counts:
            point.files_at_kill, point.temporary_at_kill = counts["files"], counts["temporary"]
    point.units_at_kill = units(stage, out)
    at_kill = snapshot(stage, out)
    started = time.monotonic()
    try:
        result, _ = runner.run(stage, out)
    except RuntimeError as error:
        point.checks["rerun completes"] = f"FAILED: {error}"
        return point
    point.checks["rerun completes"] = "ok"
    point.rerun_s = round(time.monotonic() - started, 3)
    _checked(point, "committed work not redone", lambda: check_not_redone(stage, at_kill, result, out))
    _checked(point, "equal to the uninterrupted run", lambda: check_equal(stage, out, reference))
    _checked(point, "final artefacts read back", lambda: check_published(stage, out))
    if stage == "train":
        _checked(point, "final step count", lambda: _assert(result["global_step"] == TRAIN_STEPS, result))
    return point


def _assert(condition: bool, detail: Any) -> None:
    assert condition, detail


def run_suite(work: Path, stages: list[str], points: int, seed: int, kills: int = 1) -> dict[str, Any]:
    """Reference run per stage, then ``points`` kill points each; every record and timing."""
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    runner = Runner(work)
    summary: dict[str, Any] = {"seed": seed, "points": points, "kills_per_point": kills, "stages": {}}
    records = []
    for stage in stages:
        reference = work / "reference" / stage
        started = time.monotonic()
        _, times = runner.run(stage, reference)
        rng = random.Random(f"{seed}:{stage}")
        stage_records = [kill_point(runner, stage, n, reference, times, rng, kills) for n in range(points)]
        records += stage_records
        summary["stages"][stage] = {"reference_unit_times_s": [round(t, 3) for t in times],
                                    "seconds": round(time.monotonic() - started, 1)}
    summary["records"] = [asdict(record) for record in records]
    summary["failures"] = [(r.stage, r.point, name, outcome) for r in records
                           for name, outcome in r.checks.items() if outcome != "ok"]
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """One line per stage: kill points, where they landed, what every check said."""
    lines = ["| stage | kill points | units committed at kill (min-max of n) | runs finished before kill "
             "| temp files left at kill (max) | checks failed | mean rerun s |", "|---|---|---|---|---|---|---|"]
    for stage in summary["stages"]:
        rows = [r for r in summary["records"] if r["stage"] == stage]
        failed = sum(outcome != "ok" for r in rows for outcome in r["checks"].values())
        checks = sum(len(r["checks"]) for r in rows)
        landed = [r["units_at_kill"] for r in rows]
        lines.append(f"| {stage} | {len(rows)} | {min(landed)}-{max(landed)} of {total_units(stage)} | "
                     f"{sum(r['finished_first'] for r in rows)} | {max(r['temporary_at_kill'] for r in rows)} | "
                     f"{failed} of {checks} | {np.mean([r['rerun_s'] for r in rows]):.1f} |")
    return "\n".join(lines)


def storage_markdown(records: list[dict[str, Any]]) -> str:
    """One line per stage: which writes failed, what was left, what the checks said."""
    lines = ["| stage | ENOSPC points | files hit | temp files left (max) | checks failed |", "|---|---|---|---|---|"]
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = [r for r in records if r["stage"] == stage]
        hit = sorted({str(r["failed_file"]) for r in rows})
        failed = sum(outcome != "ok" for r in rows for outcome in r["checks"].values())
        left = max((r["temporary_left"] or 0) for r in rows)
        lines.append(f"| {stage} | {len(rows)} | {', '.join(hit)} | {left} | "
                     f"{failed} of {sum(len(r['checks']) for r in rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10, help="kill points per stage")
    parser.add_argument("--kills", type=int, default=1, help="SIGKILLs of one folder before its rerun")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "faults")
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="skip the CLI probe (planted pickle, deleted and cut outputs through `tokencompose run`)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work / "points", ignore_errors=True)
    shutil.rmtree(args.work / "reference", ignore_errors=True)
    started = time.monotonic()
    summary = run_suite(args.work, args.stages, args.points, args.seed, args.kills)
    shutil.rmtree(args.work / "storage-faults", ignore_errors=True)
    summary["storage"] = storage_sweep(args.work, args.stages, args.points, args.seed)
    summary["damage"] = damage_sweep(args.work, args.points, args.seed) if "train" in args.stages else []
    shutil.rmtree(args.work / "probe", ignore_errors=True)
    summary["probe"] = probe_sweep(args.work / "probe") if args.probe else []
    summary["failures"] += [(r["stage"], r["point"], name, outcome)
                            for r in summary["storage"] + summary["damage"] + summary["probe"]
                            for name, outcome in r["checks"].items() if outcome != "ok"]
    summary["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    print(storage_markdown(summary["storage"]))
    if summary["damage"]:
        print(damage_markdown(summary["damage"]))
    if summary["probe"]:
        print(probe_markdown(summary["probe"]))
    print(f"{len(summary['records'])} kill points in {summary['seconds']} s; failures: {summary['failures'] or 'none'}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
