"""The `tokencompose` command: stage verbs and fail-fast configuration errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import main
from tokencompose_core.stages import STAGES


def test_help_lists_every_stage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    )
    for verb in ["nouns", "masks", "train", "sample", "score", "run", "demo"]:
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
