"""``tokencompose demo`` / ``make demo``: the embedded synthetic-world experiment.

Pre-train a small pixel-space model on the synthetic world, fine-tune it plain and
with TokenCompose's grounding losses (same seeds, data and steps), sample both from
the same noise, detect, score and report whether grounding helped. Every step is a
cached task, so a second run with the same profile does no work. ``quick`` runs
the same steps at toy size (the CI smoke test).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import Task, flow
from prefect.artifacts import create_markdown_artifact

from tasks import demo as tasks
from tasks.common import configured, recompute_unless
from tokencompose_core import demo, storage
from tokencompose_core.config import PipelineConfig
from tokencompose_core.identity import value_hash
from tokencompose_core.models import fingerprint as models_fingerprint


def _fresh(task: Task, done_uri: str) -> Task:
    """``task``, recomputed instead of read from the cache if its output was deleted."""
    return recompute_unless(task, storage.exists(done_uri))


@flow(name="demo-experiment", log_prints=True)
def experiment_flow(config_json: dict[str, Any]) -> dict[str, Any]:
    """The experiment's DAG for one demo profile (see tokencompose_core.demo).

    The world and the base model are built in the flow's process, on every core;
    the fine-tunes and each model's sampling and scoring are independent, so they
    are submitted to the profile's task runner (the demo's: a local Dask cluster
    with one single-threaded worker per core, which beats one two-threaded
    process on these small models).
    """
    config = PipelineConfig.model_validate(config_json)
    world_key = value_hash([demo.world_path(config), models_fingerprint(config.models)])
    started = time.perf_counter()
    world = _fresh(tasks.build_world, storage.join(demo.world_path(config), "prompts.json"))(config, world_key)
    print(f"world: {world['train']['images']} training images, prompts {world['prompts_uri']}")
    prompts_uri = world["prompts_uri"]
    paths = {model: demo.model_paths(config, model) for model in demo.model_names(config)}
    # Each task's fingerprint is the folder it writes: its name digests what makes the output.
    base = _fresh(tasks.train_model, storage.join(paths["base"]["unet"], "config.json"))(
        config, "base", world["pretrain"]["cache_uri"], None, paths["base"]["train"])
    finetunes = {model: _fresh(tasks.train_model, storage.join(paths[model]["unet"], "config.json")).submit(
                     config, model, world["train"]["cache_uri"], base["unet_uri"], paths[model]["train"])
                 for model in demo.model_names(config) if model != "base"}
    scores = {}
    for model, where in paths.items():
        upstream = [finetunes[model]] if model in finetunes else None
        index = _fresh(tasks.sample_model, storage.join(where["samples"], "index.parquet")).submit(
            config, model, where["unet"], prompts_uri, where["samples"], wait_for=upstream)
        scores[model] = _fresh(tasks.score_model, storage.join(where["scores"], "scores.json")).submit(
            config, model, index, where["unet"], world["test"]["cache_uri"], prompts_uri, where["scores"])
    runs = {"base": base} | {model: future.result() for model, future in finetunes.items()}
    for model, run in runs.items():
        print(f"trained {model}: {run['final_losses']}")
    results = recompute_unless(tasks.write_results, demo.results_current(config))(
        config, {model: future.result() for model, future in scores.items()},
        {model: run["output_uri"] for model, run in runs.items()}, demo.settings_digest(config))
    summary = "\n\n".join([results["table_markdown"], results["conclusions_markdown"], results["verdict"]])
    create_markdown_artifact(key="demo-results", markdown=summary, description=f"demo {config.name}")
    print(summary)
    return {"profile": config.name, "output_uri": config.storage.root, "reports": results["uris"],
            "verdict": results["verdict"], "seconds": round(time.perf_counter() - started, 1)}


@flow(name="demo", log_prints=True)
def demo_flow(quick: bool = False, out: str | None = None, overrides: list[str] | None = None) -> dict:
    """The demo; ``quick``: the <= 3 minute smoke version; ``out``: output folder;
    ``overrides``: ``section.field=value`` changes to the demo profile."""
    config = demo.load_demo_config(quick, out, overrides)
    return configured(experiment_flow, config)(config.model_dump(mode="json"))
