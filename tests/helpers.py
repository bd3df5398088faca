"""Helpers the test modules share: one place, so that no test module imports another.

Fixtures shared by several modules live in ``conftest.py``; plain functions and constants here.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tokencompose_core import checkpoints, rle
from tokencompose_core.config import PipelineConfig, load_config
from tokencompose_core.mask_cache import commit_shard
from tokencompose_core.models import clip_tokenizer
from tokencompose_core.sampling import sample
from tokencompose_core.text import token_positions
from tokencompose_core.train import train

# Settings that make the real five stages demo-sized: tiny models, a few steps, one prompt.
PIPELINE_SETTINGS = ["masks.shard_size=2", "masks.batch_size=2", "train.max_steps=2", "train.batch_size=1",
                     "train.checkpoint_every=2", "train.resolution=32", "sample.max_prompts=1",
                     "sample.images_per_prompt=1", "sample.num_inference_steps=2", "score.heldout_images=2",
                     "score.report_overlays=0"]

COLOURS = {"square": (220, 30, 30), "circle": (30, 30, 220), "cross": (30, 200, 30)}


def photo_manifest(folder: Path) -> str:
    """A three-photo manifest (scikit-image's astronaut, cat and coffee) with one caption each."""
    import skimage.data

    rows = []
    for name, caption in [("astronaut", "An astronaut holding a flag."), ("chelsea", "A cat next to a wall."),
                          ("coffee", "A cup of coffee with a spoon.")]:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((64, 48)).save(folder / f"{name}.png")
        rows.append({"image": f"{name}.png", "captions": [caption]})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder / "manifest.jsonl")


def _stage_task_runs(runs: list) -> list:
    """The stage tasks' runs: bookkeeping tasks (plan, seal) look at the disk on every run and
    composing tasks only call stage flows, so neither is ever cached nor says anything about
    what the cache served."""
    from tasks.common import BOOKKEEPING, COMPOSES

    return [run for run in runs if BOOKKEEPING not in run.name and COMPOSES not in run.name]


def flow_tree_task_runs(flow_run_id: UUID) -> list:
    """The stage task runs of a flow run and of every flow run below it (its subflows, and flows
    its tasks ran), however deep."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId)

    found, calls, pending = [], set(), [flow_run_id]
    with get_client(sync_client=True) as client:
        while pending:
            current = pending.pop()
            found += client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
                any_=[current])))
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[current])))
            calls |= {child.parent_task_run_id for child in children}  # the task run standing for a subflow call
            pending += [child.id for child in children]
    return _stage_task_runs([run for run in found if run.id not in calls])


def subflow_task_states(parent_run_id: UUID) -> dict[str, list[str]]:
    """State names of the stage task runs of each stage subflow of a pipeline run, by flow name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId)

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_run_id])))
        states: dict[str, list[str]] = {}
        for child in children:
            name = client.read_flow(child.flow_id).name
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[child.id])))
            states[name] = sorted(run.state.name for run in _stage_task_runs(runs))
    return states


def flow_task_states(flow_run_id: UUID) -> list[str]:
    """State names of the stage task runs of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.state.name for run in _stage_task_runs(runs)]


def cli_summary(argv: list[str]) -> dict:
    """A `tokencompose` command through its entry point: it must succeed; the summary it prints."""
    from flows.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return json.loads(printed.getvalue())


def run_pipeline(manifest: str, overrides: list[str], profile: str = "tiny") -> tuple[dict, dict[str, set[str]]]:
    """`tokencompose run -p <profile>` through the CLI: its summary (what it prints), and the task
    states of each stage."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    summary = cli_summary(["run", "-p", profile, "--input", manifest, *overrides])
    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
                                          sort=FlowRunSort.START_TIME_DESC, limit=1)
    return summary, {stage: set(states) for stage, states in subflow_task_states(latest.id).items()}


def stage_folders(summary: dict) -> dict[str, str]:
    """Each stage's output folder (stage 1 hands on the nouns table inside its folder)."""
    uris = {stage: info["output_uri"] for stage, info in summary["stages"].items()}
    return {stage: str(Path(uri).parent) if Path(uri).suffix else uri for stage, uri in uris.items()}


def make_cache(root: Path, images: int = 10, side: int = 64) -> str:
    """A mask cache of coloured boxes with exact masks; the last image has no grounded noun."""
    tokenizer = clip_tokenizer()
    rng = np.random.default_rng(0)
    rows = []
    box = side * 3 // 8
    for index in range(images):
        nouns = list(COLOURS)[: 1 + index % 3] if index < images - 1 else []
        caption = "a photo of " + (" and ".join(f"a {noun}" for noun in nouns) or "an empty room")
        canvas = np.full((side, side + 16, 3), 128, dtype=np.uint8)  # not square: exercises the crop
        uri = str(root / "images" / f"img{index}.png")
        base = dict(image_id=f"img{index:02d}", image_uri=uri, caption=caption, height=side, width=side + 16,
                    box=[0.0, 0.0, 1.0, 1.0], score=0.9, fingerprint="fixture")
        for noun in nouns:
            y, x = rng.integers(0, side - box, size=2) + (0, 8)
            mask = np.zeros((side, side + 16), dtype=bool)
            mask[y : y + box, x : x + box] = True
            canvas[mask] = COLOURS[noun]
            positions = list(token_positions(caption, noun, tokenizer))
            rows.append({**base, "noun": noun, "token_positions": positions, "mask_counts": rle.encode(mask)})
        if not nouns:
            rows.append({**base, "noun": None, "token_positions": [], "mask_counts": None})
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(uri)
    cache = str(root / "masks")
    commit_shard(cache, "shard-00000", pd.DataFrame(rows))
    return cache


def train_config(tmp_path: Path, *overrides: str) -> PipelineConfig:
    """The tiny profile trained for 4 steps with a checkpoint every 2."""
    return load_config("tiny", [f"storage.root={tmp_path}", "train.max_steps=4", "train.checkpoint_every=2",
                                "train.log_every=2", *overrides])


def train_run(config: PipelineConfig, cache_uri: str, output_uri: str, **options: Any) -> Any:
    """Stage 3's training loop with ``config``'s sections, as the train task calls it."""
    return train(config.train, config.models, cache_uri, output_uri, config.score.heldout_images, **options)


def sample_run(config: PipelineConfig, model_dir: str, out_uri: str, prompts: list, **options: Any) -> str:
    """Stage 4's sampler with ``config``'s sections, as the sample task calls it."""
    return sample(config.sample, config.models, model_dir, out_uri, prompts, **options)


class _Interrupted(RuntimeError):
    pass


def resume_after_kill(monkeypatch: pytest.MonkeyPatch, config: PipelineConfig, cache_uri: str, output_uri: str,
                      die_after: int) -> Any:
    """Train into ``output_uri``, killed right after checkpoint ``die_after``, then rerun it to the end."""
    save = checkpoints.TrainingState.save

    def save_then_die(self, output_dir, step, state, keep):
        save(self, output_dir, step, state, keep)
        if step == die_after:
            raise _Interrupted(f"killed after checkpoint {die_after}")

    monkeypatch.setattr(checkpoints.TrainingState, "save", save_then_die)
    with pytest.raises(_Interrupted):
        train_run(config, cache_uri, output_uri)
    monkeypatch.setattr(checkpoints.TrainingState, "save", save)
    return train_run(config, cache_uri, output_uri)


def tiny_owlvit(folder: Path) -> str:
    """A random-init OWL-ViT saved as a local model folder (no weights can be downloaded here)."""
    import torch
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from tokencompose_core.models.tokenizers import owlv2_tokenizer

    text = {"vocab_size": 49408, "max_position_embeddings": 16, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 0}
    vision = {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)
                             ).save_pretrained(folder)
    OwlViTProcessor(image_processor=OwlViTImageProcessor(size={"height": 32, "width": 32},
                                                         crop_size={"height": 32, "width": 32}),
                    tokenizer=owlv2_tokenizer()).save_pretrained(folder)
    return str(folder)


STAND_IN_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def stand_in_images(folder: Path, names: list[str]) -> None:
    """Small noisy JPEGs (or PNGs, by name) of distinct colours, for image sets of a few files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in zip(names, STAND_IN_COLOURS):
        pixels = np.random.default_rng(len(name)).integers(0, 60, (48, 64, 3), dtype=np.uint8) + np.uint8(colour) // 2
        Image.fromarray(pixels).save(folder / name)


def coco_stand_in(folder: Path) -> tuple[str, str]:
    """A captions_val2017.json of four JPEG images with three captions each, and its images folder."""
    names = [f"{image_id:012d}.jpg" for image_id in (139, 285, 632, 724)]
    stand_in_images(folder / "val2017", names)
    images = [{"id": int(name[:-4]), "file_name": name, "height": 48, "width": 64} for name in names]
    notes = [{"id": 1000 + 10 * i + k, "image_id": image["id"], "caption": f"A photo of thing {i} seen {k} times.\n"}
             for i, image in enumerate(images) for k in range(3)]
    captions = folder / "annotations" / "captions_val2017.json"
    captions.parent.mkdir(parents=True, exist_ok=True)
    captions.write_text(json.dumps({"images": images, "annotations": notes}))
    return str(captions), str(folder / "val2017")


def flickr30k_stand_in(folder: Path) -> None:
    """Flickr30k's download in miniature: results_20130124.token (five captions per image) and flickr30k-images/."""
    names = ["1000092795.jpg", "10002456.jpg"]
    stand_in_images(folder / "flickr30k-images", names)
    (folder / "results_20130124.token").write_text(
        "".join(f"{name}#{k}\tSomeone {k} in picture {name[:-4]}.\n" for name in names for k in range(5)))
