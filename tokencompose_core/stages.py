"""The five stages: one registry for the CLI, the pipeline and the cache keys.

Each stage's outputs depend on the models, its own config section and the
sections of the stages upstream of it; never on a downstream section, and never
on fields that only change how it runs (batch sizes of per-item work, devices,
folder names). :func:`stage_fingerprint` hashes exactly that, so a changed
setting redoes its own stage and the stages after it, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokencompose_core.config import PipelineConfig
from tokencompose_core.identity import value_hash
from tokencompose_core.pinning import pinned_settings


@dataclass(frozen=True)
class Stage:
    name: str
    flow: str  # "module:function" of its Prefect flow
    output_key: str  # the key of its summary that names its output (the next stage's input)
    help: str
    # Fields of its own section that do not change what it produces.
    execution_only: frozenset[str] = frozenset()


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("nouns", "flows.preprocess:nouns_flow", "nouns_uri",
          "stage 1: captions -> noun phrases and token positions",
          # The manifest is an input, keyed by its content; batching does not change tags.
          frozenset({"manifest", "batch_size"})),
    Stage("masks", "flows.preprocess:masks_flow", "cache_uri",
          "stage 2: Grounded-SAM masks into the Parquet mask cache",
          frozenset({"batch_size", "device"})),
    Stage("train", "flows.train:train_flow", "output_uri",
          "stage 3: fine-tune the U-Net with the grounding losses",
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


def stage_settings(config: PipelineConfig, stage: str) -> dict:
    """The settings ``stage``'s outputs depend on: its own and upstream sections' result fields.

    One cross-stage read: training leaves out the images stage 5 scores attention
    mIoU on (``train.exclude_heldout``), so their count is one of its settings. Stage 1
    rejects images outside ``storage.allowed_roots``, so those roots are among its
    settings when set. And stage 5's scoring networks count by content
    (:func:`tokencompose_core.models.scorers.scorers_fingerprint`).
    """
    sections = {name: getattr(config, name).model_dump(mode="json", exclude=set(STAGES[name].execution_only))
                for name in upstream(stage)}
    if "nouns" in sections:
        # Which image paths a manifest may use decides which rows stage 1 rejects. Counted only
        # when they restrict more than before the rules existed, so earlier keys stay.
        if config.nouns.allow_absolute_image_paths:
            del sections["nouns"]["allow_absolute_image_paths"]
        if config.storage.allowed_roots:
            sections["nouns"]["image_roots"] = config.storage.allowed_roots
    pinned_settings(config, sections)  # the image allowlist by content; pinned-regeneration switches
    if "train" in sections and not config.train.grounding.normalize_by_layers:
        # Counted only when on: runs trained before the switch existed keep their keys.
        del sections["train"]["grounding"]["normalize_by_layers"]
    if "train" in sections and config.train.exclude_heldout:
        sections["train"]["heldout_images"] = config.score.heldout_images
    if "train" in sections and not config.train.lora.rank:
        del sections["train"]["lora"]  # LoRA off: full fine-tunes keep the keys they had before LoRA existed
    if "score" in sections:
        # The scoring networks are named by path or hub id: their content counts too.
        from tokencompose_core.models.scorers import scorers_fingerprint

        sections["score"]["scorers"] = scorers_fingerprint(config.score.inception_weights, config.score.clip_model)
    return sections


def stage_fingerprint(config: PipelineConfig, stage: str) -> str:
    """Short hash of the models and :func:`stage_settings` of ``stage``.

    A change to ``train.learning_rate`` changes the fingerprints of train, sample
    and score, never those of nouns or masks; a change to ``sample.batch_size``
    changes none.
    """
    from tokencompose_core.models import fingerprint as models_fingerprint

    return value_hash({"models": models_fingerprint(config.models), "sections": stage_settings(config, stage)})
