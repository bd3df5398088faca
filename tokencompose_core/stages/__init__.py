"""The five stages, each declared once: the only registry of the pipeline.

A stage is a module here (``nouns``, ``masks``, ``train``, ``sample``, ``score``)
with the same three parts:

- ``plan(config, input_uri)``: what it reads (its inputs' identities), where it
  writes (its output folder, named by :func:`tokencompose_core.outputs.output_folder`)
  and its units of work (mask shards, one training run, sample shards, score steps);
- the functions that run one unit, pure library code the Prefect tasks wrap;
- ``summary(plan, results)``: what its flow returns, with the URI the next stage reads.

:data:`STAGES` lists them in pipeline order; the CLI verbs, the pipeline, the
generic flow path and the cache keys read it.

A stage's outputs depend on the models, its own config section and the sections
of the stages upstream of it; never on a downstream section, and never on fields
that only change how it runs (batch sizes of per-item work, devices, folder
names). :func:`stage_fingerprint` hashes exactly that, so a changed setting redoes
its own stage and the stages after it, and nothing else.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from tokencompose_core.config import PipelineConfig
from tokencompose_core.identity import KEY_SCHEMA, uri_identity, value_hash
from tokencompose_core.pinning import allowlist_identity


@dataclass(frozen=True)
class Stage:
    name: str  # CLI verb, config section and module name
    flow: str  # "module:function" of its Prefect flow
    output_key: str  # the key of its summary that names its output (the next stage's input)
    help: str
    # Fields of its own section that do not change what it produces.
    execution_only: frozenset[str] = frozenset()

    @property
    def module(self) -> ModuleType:
        """``tokencompose_core.stages.<name>``: its plan and units (imported on demand: they
        pull heavy libraries)."""
        return importlib.import_module(f"{__name__}.{self.name}")


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("nouns", "flows.preprocess:nouns_flow", "nouns_uri",
          "stage 1: captions -> noun phrases and token positions",
          # The manifest is an input, keyed by its content; batching does not change tags.
          frozenset({"manifest", "batch_size"})),
    Stage("masks", "flows.preprocess:masks_flow", "cache_uri",
          "stage 2: Grounded-SAM masks into the Parquet mask cache",
          frozenset({"batch_size", "device"})),
    Stage("train", "flows.train:train_flow", "output_uri",
          "stage 3: fine-tune the U-Net (or MMDiT transformer) with the grounding losses",
          # Checkpoint cadence and resumption change where a run can restart, not its result
          # (resume is exact); run_name only names the folder.
          frozenset({"num_workers", "log_every", "run_name", "resume", "checkpoint_every",
                     "checkpoints_total_limit", "cache_samples", "cache_text_embeddings"})),
    Stage("sample", "flows.sample:sample_flow", "output_uri",
          "stage 4: batched, seeded image generation",
          # Short batches are padded, so an image does not depend on its batch.
          frozenset({"batch_size", "device", "num_shards", "tag"})),
    Stage("score", "flows.evaluate:evaluate_flow", "output_uri",
          "stage 5: MultiGen, attention mIoU and reports",
          frozenset({"detector_batch_size", "device", "mask_cache", "metrics_batch_size"})),
)}


def upstream(stage: str) -> list[str]:
    """``stage`` and every stage before it, in DAG order."""
    order = list(STAGES)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(order)}")
    return order[: order.index(stage) + 1]


def section_settings(stage: str, section: BaseModel) -> dict[str, Any]:
    """The fields of ``stage``'s own section that change what it produces."""
    return section.model_dump(mode="json", exclude=set(STAGES[stage].execution_only))


def stage_settings(config: PipelineConfig, stage: str) -> dict:
    """The settings ``stage``'s outputs depend on: its own and upstream sections' result fields.

    The allowlist ``nouns.image_ids`` and the U-Net ``train.init_unet`` count by content.
    Three cross-section reads: stage 1 reads image paths only under
    ``storage.allowed_roots``, so those roots decide its rejects; training leaves out
    the images stage 5 scores attention mIoU on (``train.exclude_heldout``), so their
    count is one of its settings; and stage 5's scoring networks count by content
    (:func:`tokencompose_core.models.scorers.scorers_fingerprint`).
    """
    sections = {name: section_settings(name, getattr(config, name)) for name in upstream(stage)}
    sections["nouns"]["image_roots"] = config.storage.allowed_roots
    # The image allowlist counts by its ids, however it is given (a shipped list's name, a file).
    sections["nouns"]["image_ids"] = allowlist_identity(config.nouns.image_ids)
    if "train" in sections:
        # How many processes train together shapes the run (each takes a batch): the count
        # this machine resolves the setting to.
        from tokencompose_core.launch import resolve_num_processes

        sections["train"]["num_processes"] = resolve_num_processes(config.train.num_processes)
    if "train" in sections and config.train.init_unet:
        # The U-Net a fine-tune starts from counts by its content, wherever it lies.
        sections["train"]["init_unet"] = uri_identity(config.train.init_unet)
    if "train" in sections and config.train.exclude_heldout:
        sections["train"]["heldout_images"] = config.score.heldout_images
    if "score" in sections:
        from tokencompose_core.models.scorers import scorers_fingerprint

        sections["score"]["scorers"] = scorers_fingerprint(config.score.inception_weights, config.score.clip_model)
    return sections


def stage_fingerprint(config: PipelineConfig, stage: str) -> str:
    """Short hash of the key schema, the models and :func:`stage_settings` of ``stage``.

    A change to ``train.learning_rate`` changes the fingerprints of train, sample
    and score, never those of nouns or masks; a change to ``sample.batch_size``
    changes none.
    """
    from tokencompose_core.models import fingerprint as models_fingerprint

    return value_hash({"schema": KEY_SCHEMA, "models": models_fingerprint(config.models),
                       "sections": stage_settings(config, stage)})
