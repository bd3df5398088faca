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
from tasks.common import configured
from tokencompose_core import demo, storage
from tokencompose_core.config import PipelineConfig
from tokencompose_core.models import fingerprint as models_fingerprint


def _run(task: Task, done_uri: str, *args: Any) -> Any:
    """Run ``task``; if its output was deleted since it was cached, recompute it."""
    if not storage.exists(done_uri):
        task = task.with_options(refresh_cache=True)
    return task(*args)


@flow(name="demo-experiment", log_prints=True)
def experiment_flow(config_json: dict[str, Any]) -> dict[str, Any]:
    """The experiment's DAG for one demo profile (see tokencompose_core.demo)."""
    config = PipelineConfig.model_validate(config_json)
    fingerprint = models_fingerprint(config.models)
    started = time.perf_counter()
    world = _run(tasks.build_world, storage.join(demo.world_path(config), "prompts.json"), config_json, fingerprint)
    print(f"world: {world['train']['images']} training images, prompts {world['prompts_uri']}")
    trained: dict[str, dict[str, Any]] = {}
    for model in demo.model_names(config):
        init = None if model == "base" else trained["base"]["unet_uri"]
        done = storage.join(demo.model_paths(config, model)["train"], "unet", "config.json")
        trained[model] = _run(tasks.train_model, done, config_json, model, world["train"]["cache_uri"], init,
                              fingerprint)
        print(f"trained {model}: {trained[model]['final_losses']}")
    scores: dict[str, str] = {}
    for model in demo.model_names(config):
        paths, unet = demo.model_paths(config, model), trained[model]["unet_uri"]
        index = _run(tasks.sample_model, storage.join(paths["samples"], "index.parquet"), config_json, model, unet,
                     world["prompts_uri"], fingerprint)
        scores[model] = _run(tasks.score_model, storage.join(paths["scores"], "scores.json"), config_json, model,
                             index, unet, world["test"]["cache_uri"], world["prompts_uri"], fingerprint)
    results = _run(tasks.write_results, storage.join(config.storage.root, "reports", "results.json"), config_json,
                   scores, {m: t["output_uri"] for m, t in trained.items()}, fingerprint)
    summary = "\n\n".join([results["table_markdown"], results["differences_markdown"], results["verdict"]])
    create_markdown_artifact(key="demo-results", markdown=summary, description=f"demo {config.name}")
    print(summary)
    return {"profile": config.name, "output_uri": config.storage.root, "reports": results["uris"],
            "verdict": results["verdict"], "seconds": round(time.perf_counter() - started, 1)}


@flow(name="demo", log_prints=True)
def demo_flow(quick: bool = False, out: str | None = None) -> dict:
    """The demo; ``quick``: the <= 3 minute smoke version; ``out``: output folder."""
    config = demo.load_demo_config(quick, out)
    return configured(experiment_flow, config)(config.model_dump(mode="json"))
