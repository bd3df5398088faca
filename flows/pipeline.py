"""The whole DAG as one flow: nouns -> masks -> train -> sample -> score.

Each stage is its own flow (and CLI verb); here each runs as a subflow with the
profile's task runner and result storage (:func:`tasks.common.configured`), and
hands the next stage the URI of what it wrote. Every stage task is cached on its
inputs, code and :func:`tasks.common.stage_fingerprint`, so re-running the
pipeline redoes only the stages whose configuration (or upstream) changed.

    tokencompose run -p tiny train.learning_rate=2e-4
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from tasks.common import configured, result_storage_uri
from tokencompose_core.config import load_config

# stage -> (module, flow function, summary key of its output); the order is the DAG's.
STAGE_FLOWS: dict[str, tuple[str, str, str]] = {
    "nouns": ("flows.preprocess", "nouns_flow", "nouns_uri"),  # nouns.parquet
    "masks": ("flows.preprocess", "masks_flow", "cache_uri"),  # the mask cache folder
    "train": ("flows.train", "train_flow", "output_uri"),  # the run folder holding unet/
    "sample": ("flows.sample", "sample_flow", "output_uri"),  # the samples folder
    "score": ("flows.evaluate", "evaluate_flow", "output_uri"),  # the reports folder
}


def stage_flow(stage: str) -> Flow:
    """The flow object of ``stage`` (imported on demand: stages pull heavy libraries)."""
    module, function, _ = STAGE_FLOWS[stage]
    return getattr(importlib.import_module(module), function)


def output_uri(stage: str, summary: dict[str, Any]) -> str:
    """The URI a stage's summary names as its output: the next stage's input."""
    key = STAGE_FLOWS[stage][2]
    uri = summary.get(key) if isinstance(summary, dict) else None
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"stage {stage!r} returned no {key!r} in its summary: {summary!r}")
    return uri


@flow(name="pipeline", log_prints=True)
def pipeline_flow(profile: str = "tiny", overrides: list[str] | None = None,
                  input_uri: str | None = None) -> dict:
    """Run the five stages in order; ``input_uri`` is the nouns stage's manifest."""
    overrides = list(overrides or [])
    config = load_config(profile, overrides)  # fail on a bad override before any work
    progress = create_progress_artifact(progress=0.0, key="pipeline-progress",
                                        description=f"pipeline {config.name}: stages done (%)")
    upstream, stages = input_uri, {}
    for done, stage in enumerate(STAGE_FLOWS, start=1):
        started = time.perf_counter()
        summary = configured(stage_flow(stage), config)(profile=profile, overrides=overrides, input_uri=upstream)
        upstream = output_uri(stage, summary)
        stages[stage] = {"output_uri": upstream, "seconds": round(time.perf_counter() - started, 2),
                         "summary": summary}
        update_progress_artifact(progress, progress=100.0 * done / len(STAGE_FLOWS))
        print(f"{stage}: {upstream} ({stages[stage]['seconds']} s)")
    create_markdown_artifact(key="pipeline-summary", markdown=_summary_markdown(config.name, stages),
                             description=f"pipeline {config.name}: stage outputs")
    return {"profile": profile, "overrides": overrides, "result_storage": result_storage_uri(config),
            "stages": stages, "output_uri": upstream}


def _summary_markdown(name: str, stages: dict[str, dict[str, Any]]) -> str:
    rows = "\n".join(f"| {stage} | `{info['output_uri']}` | {info['seconds']} |" for stage, info in stages.items())
    return f"# Pipeline `{name}`\n\n| stage | output | seconds |\n|---|---|---|\n{rows}\n"
