"""Prefect task of stage 3: the training run, retried by resuming from its newest checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect.context import TaskRunContext

from tasks.common import stage_task
from tokencompose_core.config import PipelineConfig
from tokencompose_core.train import train


@stage_task
def train_task(config: dict[str, Any], cache_uri: str, output_uri: str, init_unet: str | None,
               fingerprint: str) -> dict[str, Any]:
    """Fine-tune on the mask cache; returns the :class:`TrainResult` as a dict.

    A retry (after a transient failure: I/O, lost device) always resumes from the
    newest checkpoint in ``output_uri``, whatever ``train.resume`` says, so the
    steps already done are not redone.
    """
    settings = PipelineConfig.model_validate(config)
    context = TaskRunContext.get()
    if context is not None and context.task_run.run_count > 1:
        settings.train.resume = True
    return asdict(train(settings, cache_uri, output_uri, init_unet=init_unet))
