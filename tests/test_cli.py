"""The `tokencompose` command: stage verbs and fail-fast configuration errors."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from flows.cli import main
from tokencompose_core.stages import STAGES


def test_help_lists_every_stage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    )
    for verb in ["nouns", "masks", "train", "sample", "score", "run", "demo", "fid-reference"]:
        assert verb in result.stdout


def test_every_stage_flow_is_importable() -> None:
    import importlib

    for stage in STAGES.values():
        module, function = stage.flow.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_invalid_override_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "-p", "tiny", "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_unknown_profile_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nouns", "-p", "no-such-profile"]) == 2
    assert "unknown profile" in capsys.readouterr().err


def test_override_errors_say_they_came_from_the_command_line(capsys: pytest.CaptureFixture[str],
                                                             tmp_path) -> None:
    assert main(["train", "-p", "tiny", "train.max_steps=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokencompose: override 'train.max_steps=-1': train.max_steps: ") and "yaml" not in err
    assert err.count("\n") == 1
    profile = tmp_path / "bad.yaml"
    profile.write_text("train:\n  batch_size: 0\n")
    assert main(["train", "-p", str(profile), "train.max_steps=3"]) == 2
    assert f"invalid configuration in {profile}: train.batch_size: " in capsys.readouterr().err


STAGE1_MANIFEST = str(Path(__file__).parent / "data" / "bad" / "manifest.jsonl")
STAGE1_ERROR = (f"tokencompose: {STAGE1_MANIFEST} is a stage-1 manifest (rows of 'image' and 'captions'), not a "
                f"stage-2 input; run `tokencompose nouns --input {STAGE1_MANIFEST}` on it first, or pass the nouns "
                "table (nouns.parquet) or the reference's metadata.jsonl to `tokencompose masks --input` "
                "(--debug shows the traceback)")


@pytest.fixture
def run_records(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[logging.LogRecord]]:
    """Records of Prefect's run loggers that passed the loggers' filters, whatever handlers Prefect's
    logging set-up (which replaces them, pytest's included) puts in place."""
    seen: list[logging.LogRecord] = []
    call_handlers = logging.Logger.callHandlers

    def recording(self: logging.Logger, record: logging.LogRecord) -> None:
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            seen.append(record)
        call_handlers(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", recording)
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # the failed states' one-line INFO records too
        logger.setLevel(logging.INFO)
    yield seen
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def _tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [record.getMessage() for record in records if record.exc_info]


def test_a_users_error_inside_a_flow_is_one_line_and_prefect_logs_no_traceback(
    prefect_harness, tmp_path, capsys: pytest.CaptureFixture[str], run_records: list[logging.LogRecord]
) -> None:
    argv = ["masks", "-p", "tiny", f"storage.root={tmp_path}", "--input", STAGE1_MANIFEST]
    with pytest.raises(ValueError, match="is a stage-1 manifest"):
        main([*argv, "--debug"])
    assert _tracebacks(run_records)  # with --debug Prefect reports the failed run as it always did
    capsys.readouterr()
    run_records.clear()
    assert main(argv) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if "tokencompose: " in line] == [STAGE1_ERROR]
    assert run_records and not _tracebacks(run_records)  # the run's one-line failed state is still logged
    assert not [record for record in run_records if "Failed to write result" in record.getMessage()]
    run_records.clear()
    assert main(["train", "-p", "tiny", f"storage.root={tmp_path}", "--input", str(tmp_path / "no-cache")]) == 2
    assert capsys.readouterr().err.count("tokencompose: ") == 1 and not _tracebacks(run_records)


def test_missing_weights_are_one_line(prefect_harness, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokencompose_core.manifest import read_manifest
    from tokencompose_core.stages.nouns import nouns_table, write_nouns
    from tokencompose_core.models import clip_tokenizer

    write_nouns(*nouns_table(read_manifest(STAGE1_MANIFEST).head(2), clip_tokenizer()), str(tmp_path / "nouns"))
    nouns = str(tmp_path / "nouns" / "nouns.parquet")
    assert main(["masks", "-p", "sd14", f"storage.root={tmp_path}", "--input", nouns]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "tokencompose: " in line]
    assert line.startswith("tokencompose: GroundingDINO checkpoint weights/groundingdino_swint_ogc.pth not found")


def test_a_bug_is_not_dressed_up_as_a_users_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.cli as cli

    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_run", broken)
    with pytest.raises(KeyError):
        main(["nouns", "-p", "tiny"])


@pytest.mark.parametrize(("preset", "expected"), [(None, "False"), ("true", "True")])
def test_the_cli_turns_prefect_analytics_off_unless_the_user_set_them(preset: str | None, expected: str) -> None:
    import os

    env = {key: value for key, value in os.environ.items() if key != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    if preset:
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = preset
    code = ("import flows.cli; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.analytics_enabled)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == expected
