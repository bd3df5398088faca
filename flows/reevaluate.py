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

from tasks.common import configured
from tokencompose_core import reevaluation, storage
from tokencompose_core.config import load_config
from tokencompose_core.reevaluation import newest_checkpoint


@flow(name="reevaluate", log_prints=True)
def reevaluate_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
    """Score ``input_uri`` (a folder with ``unet/``; default the newest) against the last evaluation."""
    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow

    overrides = list(overrides or [])
    config = load_config(profile, overrides)
    checkpoint = (input_uri or newest_checkpoint(config)).rstrip("/")
    tag = reevaluation.sample_tag(checkpoint, storage.join(config.storage.root, "train"))
    tagged = overrides + [f"sample.tag={tag}"]
    samples = configured(sample_flow, config)(profile=profile, overrides=tagged, input_uri=checkpoint)
    scored = configured(evaluate_flow, config)(profile=profile, overrides=tagged, input_uri=samples["output_uri"])
    scores_uri = scored["scores"][0]
    current = reevaluation.headline_scores(scores_uri)
    previous = reevaluation.previous_evaluation(config, checkpoint)
    rows = reevaluation.comparison_rows(current, previous["scores"] if previous else None)
    against = previous["checkpoint"] if previous else "nothing (first evaluation)"
    create_table_artifact(table=rows, key="reevaluation", description=f"{config.name}: {checkpoint} vs {against}")
    history_uri = reevaluation.record_evaluation(config, checkpoint, scores_uri, current)
    print(f"re-evaluated {checkpoint}: {current} (previous: {against})")
    return {"checkpoint": checkpoint, "output_uri": scores_uri, "history_uri": history_uri,
            "previous": previous["checkpoint"] if previous else None, "comparison": rows}
