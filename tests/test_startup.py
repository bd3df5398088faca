"""The first command on a fresh machine: the local Prefect server, start-up under load, fail-fast inputs.

These run the real `tokencompose` command in fresh processes with a fresh PREFECT_HOME, as a
newcomer's first minute does; no Prefect harness.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "data" / "bad"
STAGE1_MANIFEST = str(BAD / "manifest.jsonl")


def _env(home: Path) -> dict[str, str]:
    """The environment of a user who configured no Prefect API, analytics left at the default."""
    drop = {"PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_LEVEL"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PREFECT_HOME": str(home)}


def _tokencompose(home: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=_env(home),
                          capture_output=True, text=True, timeout=timeout)


def _manifest(folder: Path, rows: int = 2) -> str:
    """The first ``rows`` rows of the bad-input corpus's manifest (well-formed ones), paths made absolute."""
    lines = BAD.joinpath("manifest.jsonl").read_text().splitlines()[:rows]
    records = [json.loads(line) | {"image": str(BAD / json.loads(line)["image"])} for line in lines]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def _processes_of(home: Path) -> set[int]:
    """Every live process started with this PREFECT_HOME in its environment."""
    marker = f"PREFECT_HOME={home}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in entry.joinpath("environ").read_bytes().split(b"\0") and \
                    not entry.joinpath("stat").read_text().split(") ")[-1].startswith("Z"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _record(home: Path) -> dict:
    return json.loads((home / "tokencompose-server.json").read_text())


@pytest.fixture
def home(tmp_path: Path):
    """A fresh PREFECT_HOME whose local server is stopped, and checked gone, afterwards."""
    path = tmp_path / "prefect-home"
    yield path
    _tokencompose(path, "server", "stop", timeout=60)
    deadline = time.monotonic() + 20
    while _processes_of(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_of(path), "the local server outlived `tokencompose server stop`"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_fresh_home_with_two_busy_processes_starts_once_and_later_commands_reuse_the_server(
        home: Path, tmp_path: Path) -> None:
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        manifest, root = _manifest(tmp_path), f"storage.root={tmp_path / 'root'}"
        first = _tokencompose(home, "nouns", root, "--input", manifest)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "starting the local Prefect server" in first.stderr and "Traceback" not in first.stderr
        server = _record(home)["pid"]
        assert json.loads(first.stdout)["rows"] == 4

        again = _tokencompose(home, "nouns", root, "--input", manifest)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "starting the local Prefect server" not in again.stderr
        assert "Cached" in again.stderr and _record(home)["pid"] == server

        # A user's error inside a flow, on the same server: one line, no traceback, no serializer warnings.
        failed = _tokencompose(home, "masks", "-p", "tiny", root, "--input", STAGE1_MANIFEST)
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert "Traceback" not in failed.stderr and "telemetry" not in failed.stderr
        assert "Failed to serialize" not in failed.stderr and "Failed to write result" not in failed.stderr
        errors = [line for line in failed.stderr.splitlines() if line.startswith("tokencompose: ")]
        assert errors == [
            f"tokencompose: {STAGE1_MANIFEST} is a stage-1 manifest (rows of 'image' and 'captions'), not a "
            f"stage-2 input; run `tokencompose nouns --input {STAGE1_MANIFEST}` on it first, or pass the nouns "
            "table (nouns.parquet) or the reference's metadata.jsonl to `tokencompose masks --input` "
            "(--debug shows the traceback)"]

        status = _tokencompose(home, "server", "status")
        assert json.loads(status.stdout)["pid"] == server and _processes_of(home) == {server}
    finally:
        for process in busy:
            process.kill()
            process.wait()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_killed_command_leaves_only_the_documented_server(home: Path, tmp_path: Path) -> None:
    command = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "nouns", f"storage.root={tmp_path / 'root'}", "--input",
         _manifest(tmp_path)], cwd=ROOT, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (home / "tokencompose-server.json").exists() and command.poll() is None:
        assert time.monotonic() < deadline, "the server was never recorded"
        time.sleep(0.1)
    command.send_signal(signal.SIGKILL)
    command.wait()
    server = _record(home)["pid"]
    assert _processes_of(home) == {server}
    stopped = _tokencompose(home, "server", "stop", timeout=60)
    assert stopped.stdout.strip() == "stopped the local Prefect server"
    assert not _processes_of(home)


@pytest.mark.parametrize("argv", [
    ["nouns", "--input", "missing.jsonl"],
    ["train", "-p", "tiny", "--input", "no-such-cache"],
    ["nouns", "-p", "no-such-profile"],
    ["train", "-p", "tiny", "train.batch_size=0"],
])
def test_a_bad_input_fails_in_one_line_before_orchestration_starts(home: Path, argv: list[str]) -> None:
    result = _tokencompose(home, *argv, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("tokencompose: "), result.stderr
    assert not (home / "tokencompose-server.json").exists()  # no server was started for it


def test_a_configured_api_url_is_respected(home: Path) -> None:
    env = {**_env(home), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    code = "from flows import cli, local_server; print(local_server.configured_api_url())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "http://127.0.0.1:9/api"
    started = subprocess.run([sys.executable, "-m", "flows.cli", "server", "start"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert "PREFECT_API_URL is set" in started.stdout and not (home / "tokencompose-server.json").exists()
