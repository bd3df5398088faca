"""Prefect tasks of the embedded demo: the world and the results (cached stage tasks), and
the bookkeeping tasks that plan and seal their folders. The runs of the recipe are the
stage flows' own tasks (flows/demo.py)."""

from __future__ import annotations

from typing import Any

from tasks.common import bookkeeping_task, stage_task
from tokencompose_core import demo
from tokencompose_core.config import PipelineConfig


@stage_task
def build_world(config: PipelineConfig, nouns: dict[str, str], masks: dict[str, str], prompts_uri: str,
                fingerprint: str) -> dict[str, Any]:
    """The synthetic world's splits as stage 1-2 outputs, and the test prompts."""
    return demo.build_world(config, nouns, masks, prompts_uri)


@stage_task
def write_results(config: PipelineConfig, scores: dict[str, str], train_runs: dict[str, str], out_uri: str,
                  fingerprint: str) -> dict[str, Any]:
    """The report with its answer, grids, loss curves, results.json and results.md."""
    return demo.write_results(config, scores, train_runs, out_uri)


plan_world = bookkeeping_task(demo.plan_world)
seal_world = bookkeeping_task(demo.seal_world)
plan_results = bookkeeping_task(demo.plan_results)
seal_results = bookkeeping_task(demo.seal_results)
