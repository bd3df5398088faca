"""Test-wide setup: offline, a throw-away Prefect home, one Prefect harness per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports Prefect or the hub clients.
_PREFECT_HOME = tempfile.mkdtemp(prefix="tokencompose-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# File digests memoised on this machine (identity.file_digest) go to a throw-away folder too.
os.environ["TOKENCOMPOSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="tokencompose-cache-")

SHARED = Path(os.environ.get("TOKENCOMPOSE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's shared folder (../shared by default, $TOKENCOMPOSE_SHARED to override)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session", autouse=True)
def _no_local_server_left_behind():
    """A command run without the harness starts the CLI's local server in this session's
    PREFECT_HOME; it must not outlive the test run."""
    yield
    from flows import local_server

    local_server.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect backend for every test that runs flows."""
    from prefect.testing.utilities import prefect_test_harness

    # Generous start-up timeout: on a loaded 2-core CI machine the server can take >30 s.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_pipeline(prefect_harness, tmp_path_factory) -> dict:
    """`tokencompose run -p tiny` once per test session on the three-photo manifest, for the
    tests that only read what it made: its summary, stage states, manifest and settings."""
    from helpers import PIPELINE_SETTINGS, photo_manifest, run_pipeline

    folder = tmp_path_factory.mktemp("pipeline")
    manifest = photo_manifest(folder)
    settings = [f"storage.root={folder / 'root'}", *PIPELINE_SETTINGS]
    summary, states = run_pipeline(manifest, settings)
    return {"summary": summary, "states": states, "manifest": manifest, "settings": settings, "root": folder / "root"}


@pytest.fixture(scope="module")
def cache_uri(tmp_path_factory) -> str:
    """A mask cache of coloured boxes with exact masks (``helpers.make_cache``), one per module."""
    from helpers import make_cache

    return make_cache(tmp_path_factory.mktemp("cache"))
