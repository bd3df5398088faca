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

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks import demo as tasks
from tasks.common import configured, recompute_unless
from tokencompose_core import demo
from tokencompose_core.config import load_config
from tokencompose_core.identity import value_hash


@flow(name="demo-experiment", log_prints=True)
def experiment_flow(profile: str, overrides: list[str]) -> dict:
    """The recipe of one demo profile: world, base, fine-tunes, their samples and scores, results."""
    config = load_config(profile, overrides)
    started = time.perf_counter()
    world = tasks.plan_world(config)
    built = recompute_unless(tasks.build_world, world.whole)(config, world.nouns, world.masks, world.prompts_uri,
                                                              value_hash(world.key))
    tasks.seal_world(config, world)
    print(f"world: {built}")
    base = tasks.chain(profile, overrides, "base", world, None, steps=("train",))["train"]
    chains = {model: tasks.run_chain.submit(profile, overrides, model, world, base,
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
    return {"profile": config.name, "output_uri": plan.out_uri, "reports": results["uris"],
            "verdict": results["verdict"], "seconds": round(time.perf_counter() - started, 1)}


@flow(name="demo", log_prints=True)
def demo_flow(quick: bool = False, out: str | None = None, overrides: list[str] | None = None) -> dict:
    """The demo; ``quick``: the <= 3 minute smoke version; ``out``: output folder;
    ``overrides``: ``section.field=value`` changes to the demo profile."""
    profile, changes = demo.PROFILES[quick], demo.demo_overrides(out, overrides)
    return configured(experiment_flow, load_config(profile, changes))(profile, changes)
