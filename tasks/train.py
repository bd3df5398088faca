"""Prefect task of stage 3: the training run, retried by resuming from its newest checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect.context import TaskRunContext

from tasks.common import recompute_unless, stage_task
from tokencompose_core.config import ModelsConfig, PipelineConfig, TrainConfig
from tokencompose_core.launch import launch, resolve_num_processes
from tokencompose_core.stages.train import TrainPlan, train


@stage_task
def train_task(train_settings: TrainConfig, models: ModelsConfig, heldout_images: int, cache_uri: str,
               cache_digest: str, output_uri: str, fingerprint: str) -> dict[str, Any]:
    """Fine-tune on the mask cache; returns the :class:`TrainResult` as a dict.

    ``heldout_images``: how many cache images stage 5 scores attention mIoU on
    (left out of training when ``train.exclude_heldout``). A retry (after a
    transient failure: I/O, lost device, a process of a multi-process run that died)
    always resumes from the newest checkpoint in ``output_uri``, whatever
    ``train.resume`` says, so the steps already done are not redone. With
    ``train.num_processes`` > 1 (by default one per visible GPU) the run trains on
    that many processes (:func:`tokencompose_core.launch.launch`).
    """
    context = TaskRunContext.get()
    resume = train_settings.resume or (context is not None and context.task_run.run_count > 1)
    settings = train_settings.model_copy(update={"resume": resume})
    processes = resolve_num_processes(settings.num_processes)
    if processes > 1:  # the same loop on every process, under accelerate launch
        return launch(settings, models, cache_uri, output_uri, heldout_images, processes)
    return asdict(train(settings, models, cache_uri, output_uri, heldout_images))


def run_units(config: PipelineConfig, plan: TrainPlan) -> dict[str, Any]:
    return recompute_unless(train_task, plan.whole)(
        config.train, config.models, config.score.heldout_images, plan.cache_uri, plan.cache_identity, plan.out_uri,
        plan.fingerprint)
