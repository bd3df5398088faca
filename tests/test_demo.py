"""The embedded demo: library pieces, and the quick variant end to end through Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tokencompose_core import demo, storage
from tokencompose_core.config import load_config


def test_profiles_load_and_differ_only_in_size() -> None:
    full, quick = load_config("demo"), load_config("demo-quick")
    assert full.models.diffusion == quick.models.diffusion == "tiny-pixel"
    assert len(full.demo.finetune_seeds) >= 2 and len(quick.demo.finetune_seeds) >= 2
    assert full.demo.world.train_images > quick.demo.world.train_images
    assert full.train.token_loss_weight > 0 and full.train.pixel_loss_weight > 0
    assert demo.load_demo_config(True, "/tmp/elsewhere").storage.root == "/tmp/elsewhere"


def test_fine_tunes_differ_only_in_the_grounding_weights() -> None:
    config = load_config("demo")
    base = demo.phase_config(config, "base").train
    assert base.token_loss_weight == base.pixel_loss_weight == 0
    assert base.max_steps == config.demo.base.steps
    assert base.batch_size == config.train.batch_size  # the base phase sets no batch size of its own
    plain, grounded = (demo.phase_config(config, f"{kind}-s2").train for kind in ("plain", "grounded"))
    assert plain.seed == grounded.seed == 2 and plain.max_steps == config.demo.finetune.steps
    assert plain.batch_size == grounded.batch_size == config.demo.finetune.batch_size != config.train.batch_size
    assert plain.model_dump(exclude={"token_loss_weight", "pixel_loss_weight"}) == grounded.model_dump(
        exclude={"token_loss_weight", "pixel_loss_weight"})
    assert plain.token_loss_weight == 0 and grounded.token_loss_weight == config.train.token_loss_weight
    # Folder names follow the settings: a changed fine-tune never reuses a stale run.
    changed = load_config("demo", ["demo.finetune.steps=7"])
    assert demo.model_paths(changed, "plain-s1")["train"] != demo.model_paths(config, "plain-s1")["train"]
    assert demo.model_paths(changed, "base") == demo.model_paths(config, "base")
    # A grounding ablation retrains only the grounded models; attention mIoU reads the groups, so it is rescored.
    groups = load_config("demo", ["train.grounding.layers=[mid]"])
    for model in ("base", "plain-s3"):
        before, after = demo.model_paths(config, model), demo.model_paths(groups, model)
        assert after["train"] == before["train"] and after["samples"] == before["samples"]
        assert after["scores"] != before["scores"]
    assert demo.model_paths(groups, "grounded-s3")["train"] != demo.model_paths(config, "grounded-s3")["train"]


def _scores(mg3: float, miou: float) -> dict:
    table = {f"MG{k}": {"mean": mg3 if k == 3 else 50.0, "std": 1.0} for k in range(1, 6)}
    return {"multigen": {"3 objects": table}, "reported_ks": {"3 objects": [2, 3]},
            "segmentation": {"overall": {"miou_fixed": miou}}}


def _interval(seed: int, metric: str, low: float, high: float) -> dict:
    return {"pair": f"seed {seed}", "metric": metric, "difference": (low + high) / 2, "low": low, "high": high,
            "units": 24}


def test_a_claim_needs_every_seeds_interval_on_one_side_of_zero() -> None:
    intervals = [_interval(3, "3 objects MG3", 1.0, 9.0), _interval(4, "3 objects MG3", 0.5, 4.0),
                 _interval(3, "4 objects MG4", 2.0, 8.0), _interval(4, "4 objects MG4", -1.0, 6.0),  # holds zero
                 _interval(3, "attention mIoU", 30.0, 40.0), _interval(4, "attention mIoU", -3.0, -1.0),  # disagree
                 _interval(3, "unseen MG2", -9.0, -2.0), _interval(4, "unseen MG2", -5.0, -0.1),
                 _interval(3, "only one seed", 1.0, 2.0)]
    found = {f["metric"]: f["conclusion"] for f in demo.conclusions(intervals, [3, 4])}
    assert found == {"3 objects MG3": "helped", "4 objects MG4": "no conclusion", "attention mIoU": "no conclusion",
                     "unseen MG2": "hurt"}
    sentence = demo.verdict(demo.conclusions(intervals, [3, 4]), [3, 4])
    assert sentence.startswith("Fine-tune seeds 3, 4")
    assert "helped on 1 of 4 metrics (3 objects MG3)" in sentence and "It hurt on: unseen MG2" in sentence
    table = demo.conclusion_table(demo.conclusions(intervals, [3, 4]), [3, 4])
    assert list(table.columns) == ["metric", "seed 3", "seed 4", "conclusion"]
    assert table.iloc[0]["seed 3"] == "+5.0 [+1.0, +9.0]"


def test_results_table_reports_the_groups_ks() -> None:
    scores = {"base": _scores(10, 5), "plain-s1": _scores(20, 10), "grounded-s1": _scores(30, 60)}
    table = demo.results_table(scores)
    assert list(table.columns) == ["model", "3 objects MG2", "3 objects MG3", "attn mIoU"]
    assert table.iloc[2]["3 objects MG3"] == "30.0 ± 1.0"


def test_multigen_groups_use_the_shared_scorer() -> None:
    records = [{"prompt_id": 0, "text": "", "categories": ["circle", "square", "cross"], "heldout": True},
               {"prompt_id": 1, "text": "", "categories": ["circle", "square", "cross", "bowtie"], "heldout": False}]
    index = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "image_index": [0, 1, 0, 1]})
    detections = pd.DataFrame({"prompt_id": [0, 0, 0, 1, 1], "image_index": [0, 0, 1, 0, 0],
                               "category": ["circle", "square", "cross", "bowtie", "ring"],
                               "score": [0.9, 0.9, 0.05, 0.9, 0.9], "box": [[0, 0, 1, 1]] * 5})
    groups = demo.multigen_by_group(detections, index, records, threshold=0.1)
    assert set(groups) == {"3 objects", "4 objects", "unseen"}
    assert groups["3 objects"]["MG2"]["mean"] == 50.0  # image 0 has 2 objects, image 1 none above 0.1
    assert groups["4 objects"]["MG1"]["mean"] == 50.0  # "ring" is not a prompt category
    assert demo.reported_ks(records) == {"3 objects": [2, 3], "4 objects": [2, 3, 4], "unseen": [2, 3]}


@pytest.mark.slow
def test_quick_demo_end_to_end_and_cached(prefect_harness, tmp_path: Path) -> None:
    """The CI smoke test: every artefact exists, scores are in range, a rerun is all cache hits,
    and through the CLI a changed grounding weight reruns only the grounded models, going back none.

    (Its duration is measured in docs/RESULTS.md, not asserted: a loaded machine is slower.)"""
    from flows.demo import demo_flow

    out = tmp_path / "demo"
    summary = demo_flow(quick=True, out=str(out))
    config = demo.load_demo_config(True, str(out))
    reports = summary["reports"]
    for key in ("md", "html", "png_multigen", "png_miou", "png_loss_curves", "results_md", "results_json"):
        assert Path(reports[key]).is_file() and Path(reports[key]).stat().st_size > 0, key
    results = json.loads(Path(reports["results_json"]).read_text())
    assert set(results["scores"]) == set(demo.model_names(config))
    for model, record in results["scores"].items():
        paths = demo.model_paths(config, model)
        assert (Path(paths["train"]) / "unet" / "config.json").is_file()
        assert (Path(paths["train"]) / "loss_curve.png").is_file()
        assert Path(reports[f"png_grid_{model}"]).is_file()
        index = storage.read_parquet(record["index_uri"])
        assert len(index) == 6 * config.sample.images_per_prompt
        assert all(Path(uri).is_file() for uri in index["image_uri"])
        assert Path(record["detections_uri"]).is_file()
        for table in record["multigen"].values():
            assert all(0 <= cell["mean"] <= 100 and cell["std"] >= 0 for cell in table.values())
        overall = record["segmentation"]["overall"]
        assert 0 <= overall["miou_fixed"] <= 100 and overall["nouns"] > 0
        assert record["segmentation"]["overlays"]
    assert results["verdict"].startswith("Fine-tune seeds 1, 2, grounded minus plain")
    assert {c["metric"] for c in results["conclusions"]} >= {"3 objects MG3", "attention mIoU"}
    html = Path(reports["html"]).read_text()
    assert "grounded-s1" in html and "<img" in html
    # Cached tasks do not run: nothing they write is rewritten.
    written = [Path(reports["results_json"]), *(Path(r["index_uri"]) for r in results["scores"].values()),
               *(Path(demo.model_paths(config, m)["train"]) / "metrics.jsonl" for m in results["scores"])]
    stamps = [path.stat().st_mtime_ns for path in written]
    again = demo_flow(quick=True, out=str(out))
    assert again["verdict"] == summary["verdict"]
    assert [path.stat().st_mtime_ns for path in written] == stamps

    # Through the command a user types: change the grounding weight, then go back.
    def cli(*overrides: str) -> dict[str, list[str]]:
        from flows.cli import main

        assert main(["demo", "--quick", "--out", str(out), *overrides]) == 0
        return _demo_task_states()

    report = Path(reports["results_md"]).read_bytes()
    states = cli("train.token_loss_weight=0.3")
    # Only the two grounded fine-tunes train again, and only they are sampled and scored again.
    assert states["train_model"] == ["Cached"] * 3 + ["Completed"] * 2
    assert states["sample_model"] == states["score_model"] == ["Cached"] * 3 + ["Completed"] * 2
    assert states["build_world"] == ["Cached"] and states["write_results"] == ["Completed"]
    assert Path(reports["results_md"]).read_bytes() != report
    states = cli()
    # Back to the shipped settings: every model is a cache hit; the shared report is rewritten as it was.
    assert all(names == ["Cached"] * len(names) for task, names in states.items() if task != "write_results")
    assert Path(reports["results_md"]).read_bytes() == report


def _demo_task_states() -> dict[str, list[str]]:
    """State names per task of the latest demo experiment run, sorted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["demo-experiment"])),
                                          sort=FlowRunSort.START_TIME_DESC, limit=1)
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[latest.id])))
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return {task: sorted(names) for task, names in states.items()}
