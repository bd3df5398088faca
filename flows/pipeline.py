"""The whole DAG as one flow: nouns -> masks -> train -> sample -> score.

Each stage is its own flow (and CLI verb); here each runs as a subflow with the
profile's task runner and result storage (:func:`tasks.common.configured`), and
hands the next stage the URI of what it wrote. Every stage task is cached on its
stage fingerprint (:func:`tokencompose_core.stages.stage_fingerprint`), its
input URIs and content digests and its code, so re-running the pipeline redoes
only the stages whose settings (or upstream) changed.

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
from tokencompose_core.stages import STAGES


def stage_flow(stage: str) -> Flow:
    """The flow object of ``stage`` (imported on demand: stages pull heavy libraries)."""
    module, function = STAGES[stage].flow.split(":")
    return getattr(importlib.import_module(module), function)


def output_uri(stage: str, summary: dict[str, Any]) -> str:
    """The URI a stage's summary names as its output: the next stage's input."""
    key = STAGES[stage].output_key
    uri = summary.get(key) if isinstance(summary, dict) else None
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"stage {stage!r} returned no {key!r} in its summary: {summary!r}")
    return uri


@flow(name="pipeline", log_prints=True)
def pipeline_flow(profile: str = "tiny", overrides: list[str] | None = None,
                  input_uri: str | None = None, stages: list[str] | None = None) -> dict:
    """Run the stages in DAG order; ``input_uri`` is the first stage's input.

    ``stages`` picks a contiguous part of the DAG (default all five), e.g.
    ``["train"]``: the training deployment, with the profile's runner and cache.
    """
    overrides = list(overrides or [])
    config = load_config(profile, overrides)  # fail on a bad override before any work
    selected = _contiguous(stages or list(STAGES))
    progress = create_progress_artifact(progress=0.0, key="pipeline-progress",
                                        description=f"pipeline {config.name}: stages done (%)")
    upstream, outputs = input_uri, {}
    for done, stage in enumerate(selected, start=1):
        started = time.perf_counter()
        summary = configured(stage_flow(stage), config)(profile=profile, overrides=overrides, input_uri=upstream)
        upstream = output_uri(stage, summary)
        outputs[stage] = {"output_uri": upstream, "seconds": round(time.perf_counter() - started, 2),
                          "summary": summary}
        update_progress_artifact(progress, progress=100.0 * done / len(selected))
        print(f"{stage}: {upstream} ({outputs[stage]['seconds']} s)")
    create_markdown_artifact(key="pipeline-summary", markdown=_summary_markdown(config.name, outputs),
                             description=f"pipeline {config.name}: stage outputs")
    return {"profile": profile, "overrides": overrides, "result_storage": result_storage_uri(config),
            "stages": outputs, "output_uri": upstream}


def _contiguous(stages: list[str]) -> list[str]:
    """``stages`` in DAG order, refusing unknown names and gaps (a gap has no input URI)."""
    order = list(STAGES)
    unknown = sorted(set(stages) - set(order))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages are {', '.join(order)}")
    picked = sorted(set(stages), key=order.index)
    if order.index(picked[-1]) - order.index(picked[0]) + 1 != len(picked):
        raise ValueError(f"stages {picked} leave a gap in {' -> '.join(order)}; run a contiguous part")
    return picked


def _summary_markdown(name: str, stages: dict[str, dict[str, Any]]) -> str:
    rows = "\n".join(f"| {stage} | `{info['output_uri']}` | {info['seconds']} |" for stage, info in stages.items())
    return f"# Pipeline `{name}`\n\n| stage | output | seconds |\n|---|---|---|\n{rows}\n"
