"""Scheduled re-evaluation: score the newest trained U-Net and compare with the last one.

Run by the cron deployment in ``deployments/prefect.yaml``: it finds the newest
trained U-Net under ``<root>/train`` (a run's final ``unet/`` or a checkpoint
holding one), samples and scores it with the profile's settings, compares the
headline scores with those of the previously evaluated checkpoint and publishes
the comparison as a Prefect table artifact. The history of every evaluation is
kept in ``<root>/reevaluations/history.json``.

    reevaluate_flow("sd14")                       # the newest checkpoint
    reevaluate_flow("sd14", input_uri="runs/sd14/train/run-a")  # a given one
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.common import bookkeeping_task, configured
from tokencompose_core import reevaluation
from tokencompose_core.config import load_config

choose_checkpoint = bookkeeping_task(reevaluation.checkpoint_to_evaluate)
compare_and_record = bookkeeping_task(reevaluation.compare_and_record)


@flow(name="reevaluate", log_prints=True)
def reevaluate_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Score ``input_uri`` (a folder with ``unet/``; default the newest) against the last evaluation."""
    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow

    overrides = list(overrides or [])
    config = load_config(profile, overrides)
    checkpoint, tag = choose_checkpoint(config, input_uri)
    tagged = overrides + [f"sample.tag={tag}"]
    samples = configured(sample_flow, config)(profile=profile, overrides=tagged, input_uri=checkpoint)
    scored = configured(evaluate_flow, config)(profile=profile, overrides=tagged, input_uri=samples["output_uri"])
    scores_uri = scored["scores"][0]
    compared = compare_and_record(config, checkpoint, scores_uri)
    against = compared["previous"] or "nothing (first evaluation)"
    create_table_artifact(table=compared["rows"], key="reevaluation",
                          description=f"{config.name}: {checkpoint} vs {against}")
    print(f"re-evaluated {checkpoint}: {compared['current']} (previous: {against})")
    return {"checkpoint": checkpoint, "output_uri": scores_uri, "history_uri": compared["history_uri"],
            "previous": compared["previous"], "comparison": compared["rows"]}
