"""The embedded demo: library pieces, and the quick variant end to end through Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tokencompose_core import demo, storage
from tokencompose_core.config import PipelineConfig, load_config


def test_profiles_load_and_differ_only_in_size() -> None:
    full, quick = load_config("demo"), load_config("demo-quick")
    assert full.models.diffusion == quick.models.diffusion == "tiny-pixel"
    assert len(full.demo.finetune_seeds) >= 2 and len(quick.demo.finetune_seeds) >= 2
    assert full.demo.world.train_images > quick.demo.world.train_images
    assert full.train.token_loss_weight > 0 and full.train.pixel_loss_weight > 0
    assert demo.load_demo_config(True, "/tmp/elsewhere").storage.root == "/tmp/elsewhere"


def test_the_gpu_profile_asks_the_demos_question_at_a_larger_budget() -> None:
    """demo-gpu is the demo with the GPU budget (docs/RESULTS.md, History) on the machine's GPUs:
    the same world, prompts, losses, held-out seeds and intervals."""
    def flat(config: PipelineConfig) -> dict[str, object]:
        dumped = config.model_dump(mode="json")
        return {f"{section}.{field}": value for section, fields in dumped.items() if isinstance(fields, dict)
                for field, value in fields.items()}

    cpu, gpu = flat(load_config("demo")), flat(demo.load_demo_config(profile="demo-gpu"))
    assert {key for key in cpu if cpu[key] != gpu[key]} == {
        "storage.root", "orchestration.gpus", "sample.num_inference_steps", "sample.device", "score.device",
        "demo.base", "demo.finetune"}
    assert (gpu["demo.base"]["steps"], gpu["demo.finetune"]["steps"], gpu["train.batch_size"]) == (1200, 400, 32)
    assert gpu["demo.finetune_seeds"] == [3, 4] and gpu["sample.num_inference_steps"] == 25
    with pytest.raises(ValueError, match="no demo section"):
        demo.load_demo_config(profile="tiny")
    with pytest.raises(ValueError, match="--quick or --profile"):
        demo.load_demo_config(True, profile="demo-gpu")


def _run(config_overrides: list[str], model: str, base_run: str | None = "/runs/base") -> "PipelineConfig":
    """The demo profile as the recipe trains ``model``."""
    config = load_config("demo", config_overrides)
    return load_config("demo", [*config_overrides, *demo.run_overrides(config, model, base_run)])


def test_fine_tunes_differ_only_in_the_grounding_weights(tmp_path) -> None:
    from tokencompose_core.stages import stage_fingerprint

    config = load_config("demo")
    base = _run([], "base", None).train
    assert base.token_loss_weight == base.pixel_loss_weight == 0 and base.init_unet is None
    assert base.max_steps == config.demo.base.steps and base.torch_threads == config.demo.base_threads
    assert base.batch_size == config.train.batch_size  # the base phase sets no batch size of its own
    plain, grounded = (_run([], f"{kind}-s2").train for kind in ("plain", "grounded"))
    assert plain.seed == grounded.seed == 2 and plain.max_steps == config.demo.finetune.steps
    assert plain.init_unet == grounded.init_unet == "/runs/base"
    assert plain.batch_size == grounded.batch_size == config.demo.finetune.batch_size != config.train.batch_size
    assert plain.model_dump(exclude={"token_loss_weight", "pixel_loss_weight"}) == grounded.model_dump(
        exclude={"token_loss_weight", "pixel_loss_weight"})
    assert plain.token_loss_weight == 0 and grounded.token_loss_weight == config.train.token_loss_weight
    # Runs are keyed by their settings: a changed fine-tune never reuses a stale run.
    base_run = tmp_path / "base"
    base_run.mkdir()
    (base_run / "weights").write_bytes(b"the base model")
    run = lambda overrides, model: _run(overrides, model, str(base_run))  # noqa: E731
    changed = ["demo.finetune.steps=7"]
    assert stage_fingerprint(run(changed, "plain-s1"), "train") != stage_fingerprint(run([], "plain-s1"), "train")
    assert stage_fingerprint(run(changed, "base"), "train") == stage_fingerprint(run([], "base"), "train")
    # The U-Net a fine-tune starts from counts by its content.
    before = stage_fingerprint(run([], "plain-s1"), "train")
    (base_run / "weights").write_bytes(b"another base model")
    assert stage_fingerprint(run([], "plain-s1"), "train") != before
    # A grounding ablation retrains only the grounded runs; attention mIoU reads the groups, so it is rescored.
    groups = ["train.grounding.layers=[mid]"]
    for model in ("base", "plain-s3"):
        for stage in ("train", "sample"):
            assert stage_fingerprint(run(groups, model), stage) == stage_fingerprint(run([], model), stage)
    assert stage_fingerprint(load_config("demo", groups), "score") != stage_fingerprint(config, "score")
    assert stage_fingerprint(run(groups, "grounded-s3"), "train") != stage_fingerprint(run([], "grounded-s3"), "train")


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


def test_the_test_prompts_groups_are_scored_by_stage_five(tmp_path) -> None:
    from tokencompose_core.sampling import load_prompts
    from tokencompose_core.stages import score

    table = tmp_path / "test-prompts.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt_id": 7, "text": "a", "categories": ["circle", "square", "cross"], "groups": ["3 objects", "unseen"]},
        {"prompt_id": 9, "text": "b", "categories": ["circle", "square", "cross", "bowtie"], "groups": ["4 objects"]}]))
    prompts = load_prompts(str(table))
    assert [(p.prompt_id, p.groups) for p in prompts] == [(7, ("3 objects", "unseen")), (9, ("4 objects",))]
    groups = score.prompt_groups(prompts)
    assert groups == {"3 objects": [7], "4 objects": [9], "unseen": [7]}
    index = pd.DataFrame({"prompt_id": [7, 7, 9, 9], "image_index": [0, 1, 0, 1]})
    detections = pd.DataFrame({"prompt_id": [7, 7, 7, 9, 9], "image_index": [0, 0, 1, 0, 0],
                               "category": ["circle", "square", "cross", "bowtie", "ring"],
                               "score": [0.9, 0.9, 0.05, 0.9, 0.9], "box": [[0, 0, 1, 1]] * 5})
    by_group = score.multigen_by_group(detections, index, prompts, groups, threshold=0.1)
    assert set(by_group) == {"3 objects", "4 objects", "unseen"}
    assert by_group["3 objects"]["MG2"]["mean"] == 50.0  # image 0 has 2 objects, image 1 none above 0.1
    assert by_group["4 objects"]["MG1"]["mean"] == 50.0  # "ring" is not a prompt category
    by_id = {p.prompt_id: p for p in prompts}
    assert {g: score.reported_ks([by_id[i] for i in ids]) for g, ids in groups.items()} == {
        "3 objects": [2, 3], "4 objects": [2, 3, 4], "unseen": [2, 3]}


@pytest.mark.slow
def test_quick_demo_end_to_end_and_cached(prefect_harness, tmp_path: Path) -> None:
    """The CI smoke test: every artefact exists, every folder is a sealed stage output, scores
    are in range, and through the CLI a changed grounding weight reruns only the grounded
    run; going back is all cache hits and rewrites nothing.

    (Its duration is measured in docs/RESULTS.md, not asserted: a loaded machine is slower.)"""
    from flows.demo import demo_flow
    from tokencompose_core import outputs

    out = tmp_path / "demo"
    # One fine-tune seed: base, plain and grounded are every kind of run (the claim over
    # several seeds is the unit test above).
    seeds = ["demo.finetune_seeds=[1]"]
    summary = demo_flow(quick=True, out=str(out), overrides=seeds)
    config = demo.load_demo_config(True, str(out), seeds)
    reports, runs = summary["reports"], summary["runs"]
    for key in ("md", "html", "png_multigen", "png_miou", "png_loss_curves", "results_md", "results_json"):
        assert Path(reports[key]).is_file() and Path(reports[key]).stat().st_size > 0, key
    results = json.loads(Path(reports["results_json"]).read_text())
    assert set(results["scores"]) == set(runs) == set(demo.model_names(config))
    sealed = [summary["output_uri"], *(folder for run in runs.values() for folder in run.values())]
    sealed += [str(folder) for folder in (out / "nouns").iterdir()] + [str(f) for f in (out / "masks").iterdir()]
    assert all(outputs.is_whole(folder) for folder in sealed), [outputs.problems(f) for f in sealed]
    assert {Path(folder).parent.name for folder in sealed} == {"nouns", "masks", "train", "samples", "scores",
                                                               "reports"}
    for model, record in results["scores"].items():
        train_run = Path(runs[model]["train"])
        assert (train_run / "unet" / "config.json").is_file() and (train_run / "loss_curve.png").is_file()
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
    assert results["verdict"].startswith("Fine-tune seeds 1, grounded minus plain")
    assert {c["metric"] for c in results["conclusions"]} >= {"3 objects MG3", "attention mIoU"}
    html = Path(reports["html"]).read_text()
    # The answer comes first, from the report writer itself.
    assert html.index("Did grounding help?") < html.index("Comparison") and results["verdict"] in html
    assert "grounded-s1" in html and "loss_curves.png" in html
    # Through the command a user types: change the grounding weight, then go back.
    def cli_run(options: list[str], overrides: list[str]) -> dict[str, list[str]]:
        from flows.cli import main

        assert main(["demo", *options, "--out", str(out), *overrides, *seeds]) == 0
        return _demo_task_states()

    def cli(*overrides: str) -> dict[str, list[str]]:
        return cli_run(["--quick"], list(overrides))

    written = [Path(reports["results_json"]), *(Path(r["index_uri"]) for r in results["scores"].values()),
               *(Path(run["train"]) / "metrics.jsonl" for run in runs.values())]
    stamps = [(str(path), path.stat().st_mtime_ns) for path in written]
    report = Path(reports["results_md"]).read_bytes()
    states = cli("train.token_loss_weight=0.3")
    # Only the grounded fine-tune trains again, and only it is sampled and scored again.
    assert states["train_task"] == ["Cached"] * 2 + ["Completed"]
    for task in ("sample_shard", "merge_sample_shards", "detect", "score_multigen", "score_segmentation", "report"):
        assert states[task] == ["Cached"] * 2 + ["Completed"], (task, states[task])
    assert states["build_world"] == ["Cached"] and states["write_results"] == ["Completed"]
    states = cli()
    # Back to the shipped settings: every task is a cache hit, so nothing the first run wrote
    # is written again, and the results are the first run's.
    assert all(names == ["Cached"] * len(names) for names in states.values()), sorted(states.items())
    assert [(str(path), path.stat().st_mtime_ns) for path in written] == stamps
    assert Path(reports["results_md"]).read_bytes() == report
    # The GPU profile through the command, given the quick profile's settings: the same recipe and
    # claim, so every run is a cache hit; only its results (named after its settings) are new.
    states = cli_run(["--profile", "demo-gpu"], _settings_of("demo-quick"))
    assert {task: names for task, names in states.items() if names != ["Cached"] * len(names)} == {
        "write_results": ["Completed"]}
    (gpu_results,) = [folder for folder in (out / "reports").glob("demo-*")
                      if "Profile `demo-gpu`" in (folder / "results.md").read_text()]
    again = json.loads((gpu_results / "results.json").read_text())
    assert (again["verdict"], again["conclusions"]) == (results["verdict"], results["conclusions"])


def _settings_of(profile: str) -> list[str]:
    """Every setting of a profile's YAML as overrides (``section.field=value``), but its name and
    where and how it runs (``storage``, ``orchestration``)."""
    import yaml

    from tokencompose_core.config import profile_path

    data = yaml.safe_load(profile_path(profile).read_text())
    return [f"{section}.{field}={json.dumps(value)}" for section, fields in data.items()
            if section not in ("name", "storage", "orchestration") for field, value in fields.items()]


def _demo_task_states() -> dict[str, list[str]]:
    """State names per stage task of the latest demo experiment run and its stage subflows, sorted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from helpers import flow_tree_task_runs

    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["demo-experiment"])),
                                          sort=FlowRunSort.START_TIME_DESC, limit=1)
    states: dict[str, list[str]] = {}
    for run in flow_tree_task_runs(latest.id):
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return {task: sorted(names) for task, names in states.items()}


def test_the_scores_digest_ignores_where_results_lie_and_nothing_else() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from demo_scores_digest import scores_digest

    record = {"index_uri": "/a/index.parquet", "multigen": {"3 objects": {"MG2": {"mean": 50.0}}},
              "segmentation": {"overall": {"miou_fixed": 40.0}, "overlays": [{"uri": "/a/o.png", "iou": 0.5}]}}
    results = {"scores": {"base": record}, "conclusions": [], "verdict": "v", "table": []}
    moved = json.loads(json.dumps(results).replace("/a/", "/elsewhere/"))
    assert scores_digest(moved) == scores_digest(results)
    changed = json.loads(json.dumps(results).replace("50.0", "50.1"))
    assert scores_digest(changed) != scores_digest(results)
