"""Prefect tasks of the embedded demo: the world, one run of the recipe, the results.

The world and the results are cached stage tasks; planning and sealing their folders
are bookkeeping tasks. :func:`run_chain` runs one training run of the recipe through
the stage flows (train -> sample -> score), whose own tasks are cached: it composes
and is never cached itself, so a second ``tokencompose demo`` is all cache hits below it.
"""

from __future__ import annotations

from typing import Any

from tasks.common import bookkeeping_task, composing_task, configured, stage_task
from tokencompose_core import demo
from tokencompose_core.config import PipelineConfig, load_config


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


def chain(profile: str, overrides: list[str], model: str, world: demo.World, base_run: str | None,
          steps: tuple[str, ...] = ("train", "sample", "score")) -> dict[str, str]:
    """One run of the recipe through the stage flows (as subflows, on this process's threads)."""
    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow
    from flows.train import train_flow

    config = load_config(profile, overrides)
    here = ["orchestration.task_runner=default"]  # this process runs the stages' tasks
    trained = [*overrides, *here, *demo.run_overrides(config, model, base_run)]
    done = {"train": base_run} if model == "base" and base_run else {}
    if "train" in steps:
        split = world.pretrain_split() if model == "base" else "train"
        done["train"] = _stage(train_flow, profile, trained, world.masks[split])["output_uri"]
    if "sample" in steps:
        sampled = [*trained, *demo.sample_overrides(world)]
        done["samples"] = _stage(sample_flow, profile, sampled, done["train"])["output_uri"]
    if "score" in steps:
        scored = [*overrides, *here, *demo.score_overrides(config, world)]
        done["scores"] = _stage(evaluate_flow, profile, scored, done["samples"])["scores"][0]
    return done


def _stage(flow: Any, profile: str, overrides: list[str], input_uri: str) -> dict[str, Any]:
    return configured(flow, load_config(profile, overrides))(profile=profile, overrides=overrides, input_uri=input_uri)


run_chain = composing_task(chain)
