"""``tokencompose demo`` / ``make demo``: the embedded synthetic-world experiment, a recipe over the stages.

The world stands in for stages 1-2; the base model pre-trains in this process (on
``demo.base_threads`` threads); then every other run of the recipe (its sampling and
scoring, each fine-tune's training too) goes through the stage flows on the
profile's task runner, the demo's: a local Dask cluster with one single-threaded
worker per core. The results come last. Every step is a cached task, so a second
run with the same settings does no work. ``quick`` runs the same steps at toy size
(the CI smoke test). What each step does: ``tokencompose_core.demo``.
"""

from __future__ import annotations

import time

from typing import Any

from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate_flow
from flows.sample import sample_flow
from flows.train import train_flow
from tasks import demo as tasks
from tasks.common import composing_task, configured, recompute_unless
from tokencompose_core import demo
from tokencompose_core.config import load_config


def chain(profile: str, overrides: list[str], model: str, world: demo.World, base_run: str | None,
          steps: tuple[str, ...] = ("train", "sample", "score")) -> dict[str, str]:
    """One run of the recipe, ``model``, through the stage flows (train -> sample -> score, or the
    ``steps`` named) as subflows whose tasks run on this process's threads; the URIs of its
    run folder, samples and scores. :data:`run_chain` runs it as a task, so that runs go on
    beside each other on the demo's Dask workers; it composes and is never cached itself (the
    stage flows' tasks are)."""
    config = load_config(profile, overrides)
    here = ["orchestration.task_runner=default"]  # this process runs the stages' tasks
    trained = [*overrides, *here, *demo.run_overrides(config, model, base_run)]
    sampled = [*trained, *demo.sample_overrides(world)]
    done = {"train": base_run} if model == "base" and base_run else {}
    if "train" in steps:
        split = world.pretrain_split() if model == "base" else "train"
        done["train"] = _stage(train_flow, profile, trained, world.masks[split])["output_uri"]
    if "sample" in steps:
        done["samples"] = _stage(sample_flow, profile, sampled, done["train"])["output_uri"]
    if "score" in steps:
        scored = [*sampled, *demo.score_overrides(config, world)]
        done["scores"] = _stage(evaluate_flow, profile, scored, done["samples"])["scores"][0]
    return done


def _stage(flow: Flow, profile: str, overrides: list[str], input_uri: str) -> dict[str, Any]:
    return configured(flow, load_config(profile, overrides))(profile=profile, overrides=overrides, input_uri=input_uri)


run_chain = composing_task(chain)


@flow(name="demo-experiment", log_prints=True)
def experiment_flow(profile: str, overrides: list[str]) -> dict:
    """The recipe of one demo profile: world, base, fine-tunes, their samples and scores, results."""
    config = load_config(profile, overrides)
    started = time.perf_counter()
    world = tasks.plan_world(config)
    built = recompute_unless(tasks.build_world, world.whole)(config, world.nouns, world.masks, world.prompts_uri,
                                                              world.identity)
    tasks.seal_world(config, world)
    print(f"world: {built}")
    base = chain(profile, overrides, "base", world, None, steps=("train",))["train"]
    chains = {model: run_chain.submit(profile, overrides, model, world, base,
                                      **({"steps": ("sample", "score")} if model == "base" else {}))
              for model in demo.model_names(config)}
    runs = {model: future.result() for model, future in chains.items()}
    scores = {model: run["scores"] for model, run in runs.items()}
    plan = tasks.plan_results(config, scores)
    results = recompute_unless(tasks.write_results, plan.whole)(
        config, scores, {model: run["train"] for model, run in runs.items()}, plan.out_uri, plan.identity)
    tasks.seal_results(config, plan, scores)
    summary = "\n\n".join([results["table_markdown"], results["conclusions_markdown"], results["verdict"]])
    create_markdown_artifact(key="demo-results", markdown=summary, description=f"demo {config.name}")
    print(summary)
    return {"profile": config.name, "output_uri": plan.out_uri, "reports": results["uris"], "runs": runs,
            "verdict": results["verdict"], "seconds": round(time.perf_counter() - started, 1)}


@flow(name="demo", log_prints=True)
def demo_flow(quick: bool = False, out: str | None = None, overrides: list[str] | None = None,
              profile: str | None = None) -> dict:
    """The demo; ``quick``: the <= 3 minute smoke version; ``profile``: another demo profile
    (``demo-gpu``: the GPU budget); ``out``: output folder; ``overrides``: ``section.field=value``
    changes to the demo profile."""
    config = demo.load_demo_config(quick, out, overrides, profile)
    name, changes = demo.demo_profile(quick, profile), demo.demo_overrides(out, overrides)
    return configured(experiment_flow, config)(name, changes)
